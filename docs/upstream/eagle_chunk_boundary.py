"""vLLM 0.32.0: with chunked prefill, EAGLE's padded drafter batch gives the draft the wrong token
at the end of every non-final prefill chunk.

Plain vLLM, no plugin. Run: python docs/upstream/eagle_chunk_boundary.py

EAGLE draft row i pairs the target's hidden state h_i with the next token x_{i+1}. A request in
mid prefill ends its chunk at s = num_computed_tokens + num_scheduled_tokens, so the draft's last
row of that chunk needs x_s, the prompt token at s. The padded drafter batch (the default,
`SpecDecodeBaseProposer.prepare_next_token_ids_padded`) instead gives every discarded request its
"backup" token `get_token_id(num_tokens_no_spec - 1)`: the last prompt token. The unpadded path
(`prepare_next_token_ids_cpu`, with `disable_padded_drafter_batch`) takes `get_token_id(s)`. The
draft thus writes one wrong key/value row into its KV cache at every chunk boundary, every later
draft of the request attends to it, and what a request is proposed depends on how the scheduler
happened to chunk its prompt. Outputs stay the target's (verification is exact); acceptance drops.

The script builds a tiny random Llama target and a one-layer EAGLE draft for it in a temporary
directory, and runs one 40-token prompt greedily in four in-process engines: the padded and the
unpadded path, each with the prefill in one step and in chunks of 16 tokens. It records, without
changing anything, (a) the token each partial prefill's last draft row was given and (b) the draft
tokens proposed after each decode step, keyed by the sequence position they follow; a correct
drafter proposes the same there however the prompt was chunked.
"""

import gc
import os
import tempfile
from pathlib import Path

os.environ["VLLM_PLUGINS"] = ""  # load no general plugin (by default vLLM loads every installed one)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs here, so it can be observed
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402
import vllm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group  # noqa: E402

K = 3
PROMPT_LEN = 40
CHUNK = 16  # max_num_batched_tokens of the chunked engines: chunks 16 + 16 + 8


def write_models(root: Path) -> tuple[Path, Path]:
    """A 2-layer random Llama target and an EAGLE-1 draft for it (fc + one decoder layer without
    input_layernorm; embedding and LM head shared with the target, as vLLM does when absent)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         # Weights large enough that one wrong KV row flips some argmax proposals; at the
                         # default 0.02 a random draft's outputs are nearly flat.
                         initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(root / "target")
    draft_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    layer = LlamaForCausalLM(draft_config).state_dict()
    weights = {name.removeprefix("model."): tensor for name, tensor in layer.items()
               if name.startswith("model.layers.0.") and "input_layernorm" not in name}
    weights["fc.weight"] = torch.randn(config.hidden_size, 2 * config.hidden_size) / config.hidden_size**0.5
    (root / "draft").mkdir()
    draft_config.save_pretrained(root / "draft")
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, root / "draft" / "model.safetensors")
    return root / "target", root / "draft"


def run(target: Path, draft: Path, prompt: list[int], max_num_batched_tokens: int, padded: bool) -> dict:
    llm = LLM(model=str(target), skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
              seed=0, max_num_seqs=1, enable_prefix_caching=False, max_num_batched_tokens=max_num_batched_tokens,
              speculative_config={"method": "eagle", "model": str(draft), "num_speculative_tokens": K,
                                  "disable_padded_drafter_batch": not padded})
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    drafter = runner.drafter
    boundary_tokens, proposals = [], {}
    original_propose = type(drafter).propose
    original_next_padded = type(drafter).prepare_next_token_ids_padded
    original_next_cpu = type(drafter).prepare_next_token_ids_cpu

    def record_boundary(next_token_ids):
        # Row 0 is the only request; a partial prefill discards its sampled token.
        if runner.discard_request_mask.np[0]:
            boundary_tokens.append((int(runner.input_batch.num_computed_tokens_cpu[0]), int(next_token_ids[0])))

    def prepare_next_token_ids_padded(*args, **kwargs):
        next_token_ids, valid = original_next_padded(drafter, *args, **kwargs)
        record_boundary(next_token_ids)
        return next_token_ids, valid

    def prepare_next_token_ids_cpu(*args, **kwargs):
        next_token_ids = original_next_cpu(drafter, *args, **kwargs)
        record_boundary(next_token_ids)
        return next_token_ids

    def propose(**kwargs):
        drafts = original_propose(drafter, **kwargs)
        if not runner.discard_request_mask.np[0]:  # a request past its prefill: its proposals are used
            cad, rejected = kwargs["common_attn_metadata"], kwargs.get("num_rejected_tokens_gpu")
            last_row = int(cad.seq_lens[0]) - (0 if rejected is None else int(rejected[0])) - 1
            proposals[last_row] = drafts[0].tolist()
        return drafts

    drafter.propose = propose
    drafter.prepare_next_token_ids_padded = prepare_next_token_ids_padded
    drafter.prepare_next_token_ids_cpu = prepare_next_token_ids_cpu
    try:
        output = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=24),
                              use_tqdm=False)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {"output": list(output.outputs[0].token_ids), "boundary_tokens": boundary_tokens, "proposals": proposals}


def main() -> None:
    print(f"vLLM {vllm.__version__}; general plugins loaded: {sorted(load_plugins_by_group(DEFAULT_PLUGINS_GROUP))}")
    prompt = torch.randint(3, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    print(f"prompt: {PROMPT_LEN} tokens, last prompt token {prompt[-1]}")
    with tempfile.TemporaryDirectory() as tmp:
        target, draft = write_models(Path(tmp))
        for padded in (True, False):
            path = "padded drafter batch (the default)" if padded else "disable_padded_drafter_batch=True"
            one_step = run(target, draft, prompt, 256, padded)
            chunked = run(target, draft, prompt, CHUNK, padded)
            print(f"\n{path}, prefill in chunks of {CHUNK} vs in one step:")
            print(f"  outputs identical: {chunked['output'] == one_step['output']}")
            for computed, token in chunked["boundary_tokens"]:
                end = computed + CHUNK  # this partial prefill ran positions [computed, end)
                verdict = "right" if token == prompt[end] else "WRONG: the last prompt token"
                print(f"  chunk ending before position {end}: draft given token {token}, the prompt token at "
                      f"{end} is {prompt[end]} -> {verdict}")
            shared = sorted(set(chunked["proposals"]) & set(one_step["proposals"]))
            differ = [row for row in shared if chunked["proposals"][row] != one_step["proposals"][row]]
            print(f"  proposals at {len(shared)} decode positions: {len(differ)} differ"
                  + (f" (first after position {differ[0]}: {chunked['proposals'][differ[0]]} chunked, "
                     f"{one_step['proposals'][differ[0]]} in one step)" if differ else ""))


if __name__ == "__main__":
    main()

"""vLLM 0.32.0, CPU: speculative decoding with `top_k` set stops the engine on the first step.

Plain vLLM, no plugin. Run: python docs/upstream/top_k_empty_batch.py

With a speculative config, the V1 model runner builds spec-decode metadata on every step, also on
a step whose requests carry no draft tokens (a prefill step, for instance), and the rejection
sampler then applies the sampling constraints to the logits of zero draft positions: shape
[0, vocab]. On CPU, `apply_top_k_top_p` takes the sort-free `apply_top_k_only` for a top-k-only
request, which calls `k.max()` on the empty top-k tensor and raises. Any request with `top_k` set
and temperature > 0 stops the whole engine. The speculative method does not matter; ngram needs
no draft model, so it is used here on a tiny random Llama written to a temporary directory.
"""

import os
import tempfile

os.environ["VLLM_PLUGINS"] = ""  # load no general plugin (by default vLLM loads every installed one)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's error surfaces here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import vllm  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_general_plugins, load_plugins_by_group  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p  # noqa: E402

print(f"vLLM {vllm.__version__}; general plugins loaded: {sorted(load_plugins_by_group(DEFAULT_PLUGINS_GROUP))}")

# 1. The function, on what the rejection sampler passes for a step without draft tokens (general
# plugins loaded first, as in a worker).
load_general_plugins()
try:
    apply_top_k_top_p(torch.empty(0, 512), k=torch.empty(0, dtype=torch.int32), p=None)
    print("apply_top_k_top_p on logits [0, 512]: returned")
except RuntimeError as err:
    print(f"apply_top_k_top_p on logits [0, 512]: RuntimeError: {err}")

# 2. An engine with ngram speculation and one request with top_k.
with tempfile.TemporaryDirectory() as model_dir:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
              seed=0, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                          "prompt_lookup_min": 2, "prompt_lookup_max": 3})
    prompt = {"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8] * 4}
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    print(f"greedy: {list(greedy[0].outputs[0].token_ids)}")
    try:
        top_k = llm.generate(prompt, SamplingParams(temperature=1.0, top_k=5, max_tokens=8, seed=0),
                             use_tqdm=False)
        print(f"temperature 1, top_k 5: {list(top_k[0].outputs[0].token_ids)}")
    except Exception as err:  # noqa: BLE001 (whatever the engine raises is the observation)
        print(f"temperature 1, top_k 5: {type(err).__name__}: {err}")

"""What a ViSpec draft step costs against vLLM's own EAGLE draft at fixed K=3 (issue 18): the draft
forward alone at LLaVA-1.5-7B widths ("micro"), and the inter-token latency (ITL) in vLLM serving
("itl"), each eager and compiled (vLLM's default compilation on CPU).

    python benchmarks/step_cost.py                               # both parts, both modes
    python benchmarks/step_cost.py --part micro --modes eager    # the draft forward only, eagerly
    python benchmarks/step_cost.py --micro-modes eager           # the draft forward eagerly, ITL both ways
    python benchmarks/step_cost.py --smoke ...                   # tiny widths, the 36-token pair (tests)

How it measures:
- micro: the plugin's served draft module (`ViSpecDraftModel`) and vLLM's EAGLE draft module
  (`EagleLlamaForCausalLM`), each built as vLLM's model loader builds a draft (the model class
  under its own VllmConfig from `EngineArgs`, `load_weights`, `process_weights_after_loading`):
  the ViSpec draft from random weights in the published shapes (vispec_vllm/checkpoint_format.py,
  img_fc folded at load, the key-mask head size of this platform's attention backend: 160 on CPU,
  whose kernels take no size between 128 and 160, against 136 on a GPU), the EAGLE draft
  from random weights in the EAGLE layout, both at hidden 4096, 32 heads of 128, intermediate
  11008, vocabulary 32000 (LLaVA-1.5-7B). No engine: a 7B target does not fit beside them on this
  machine, and the forward is what is compared. So each draft's Attention layer gets a KV cache
  tensor of its own (bound as vLLM binds it) and metadata from its backend's own builder (CPU_ATTN
  here) for each row set, under vLLM's forward context. Row sets: the prefill of one request (5
  text rows, 576 image rows, 35 text rows; the ViSpec rows as vispec_vllm/row_plan.py plans one
  image, filled with `set_planned_rows` from the draft's own compressed image, as the proposer
  does), and decode steps of 1 and 16 requests with 700 tokens each already in the KV cache, at one
  row per request (a chain step) and K+1 rows per request (a decode step's first pass). Both drafts
  get the same token ids, positions and hidden states. Timed: the module's forward (no LM head, no
  metadata build, no adaptor), wall clock, after warm-up calls (which compile, in compiled mode);
  `--forwards` timed calls per draft and row set, ViSpec and EAGLE alternating call by call.
  Each row: min/median/max of the calls, ratio = ViSpec median / EAGLE median (goal <= 1.10).
- itl: servers of the shipped demo pair's target with its `vispec` draft (fixed K, load-adaptive
  speculation off) and its `eagle` draft, K=3, side by side, driven by `vllm bench serve` with the
  set-ups taking turns (benchmarks/serve_concurrency.py `run_interleaved`: warm-up per server,
  order rotated per repeat, held-out scene images new per repeat). Per repeat and server vLLM's
  client reports ITL p50, the time between a request's streamed chunks: one chunk per engine step,
  and with K fixed every step verifies K+1 tokens whichever draft proposed them, so it compares
  step costs, not acceptance. Each row gives the median over repeats with min/max, and ratio =
  ViSpec median / EAGLE median (goal <= 1.05). Eager servers run with --enforce-eager; compiled
  ones without it (on CPU vLLM then compiles target and draft with Dynamo + Inductor).

Writes benchmarks/results/step_cost.json: the machine, one row per part, mode (and dtype and row
set, or concurrency), and each part's settings with the command that measured it. A run of one part
replaces that part's rows in --out and keeps the other part's, so the two parts can be rerun apart.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from common import RESULTS, machine_description, spread_fields, write_json

from vispec_vllm.checkpoint_format import LLAMA, DraftDims, draft_config, eagle_shapes, published_shapes

K = 3
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class RowSet:
    """One draft forward's rows: `requests` requests of `rows_per_request` rows each, after
    `context` tokens of each already in the KV cache; every request has one image of
    `image_tokens` tokens at token `text_before_image`."""

    name: str
    requests: int
    rows_per_request: int
    context: int
    image_tokens: int
    text_before_image: int = 5


def row_sets(image_tokens: int, text_rows: int, decode_context: int, batch_sizes: tuple[int, ...]) -> list[RowSet]:
    prefill = RowSet("prefill", 1, image_tokens + text_rows, 0, image_tokens)
    decode = [RowSet(f"decode-chain-b{b}", b, 1, decode_context, image_tokens) for b in batch_sizes]
    first_pass = [RowSet(f"decode-first-pass-b{b}", b, K + 1, decode_context, image_tokens) for b in batch_sizes]
    return [prefill, *decode, *first_pass]


# The published ViSpec draft of LLaVA-1.5-7B (num_q 2, fc and img_fc with biases) and tiny widths.
LLAVA_1_5_7B = DraftDims(4096, 32, 128, 11008, 32000, qkv_bias=False)
ROW_SETS = row_sets(576, 40, 700, (1, 16))
SMOKE_WIDTHS = DraftDims(128, 4, 32, 256, 512, qkv_bias=False)
SMOKE_ROW_SETS = row_sets(16, 8, 40, (1, 2))
SMOKE = {"forwards": 2, "repeats": 2, "image_tokens": 36, "concurrency": [2], "prompts_per_concurrency": 2,
         "output_len": 16, "warmup_prompts": 2}
BLOCK_SIZE = 32
TARGET_LAYERS = 32  # LLaVA-1.5-7B's; only names the draft's layer (after the target's)


# --------------------------------------------------------------------------------------------
# A. The draft forward


def engine_config(directory: Path, widths: DraftDims, dtype: str, mode: str):
    """vLLM's config for a draft of `widths` over a Llama language model of the same widths (as in
    LLaVA-1.5), as `vllm serve` builds it (plugins loaded); config.json files only, no weights."""
    from transformers import LlamaConfig
    from vllm.engine.arg_utils import EngineArgs

    target, draft = directory / "target", directory / "draft"
    target.mkdir(parents=True, exist_ok=True)
    draft.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=widths.hidden_size, intermediate_size=widths.intermediate_size,
                num_attention_heads=widths.num_heads, num_key_value_heads=widths.num_heads,
                num_hidden_layers=TARGET_LAYERS, vocab_size=widths.vocab_size, max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(target)
    (draft / "config.json").write_text(json.dumps(draft_config(widths, LLAMA)))
    return EngineArgs(model=str(target), skip_tokenizer_init=True, dtype=dtype, max_model_len=2048,
                      block_size=BLOCK_SIZE, max_num_batched_tokens=2048, seed=0, enforce_eager=mode == "eager",
                      speculative_config={"method": "eagle", "model": str(draft), "num_speculative_tokens": K},
                      ).create_engine_config()


def build_draft(vllm_config, widths: DraftDims, vispec: bool):
    """A draft module as vLLM's model loader builds one, from random weights in the checkpoint's
    shapes: (module, its Attention layer)."""
    import torch
    from vispec_vllm.patches.speculative_config import attention_head_sizes
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vispec_vllm.checkpoint import ViSpecCheckpoint
    from vispec_vllm.draft_model import ViSpecDraftModel

    draft_model_config = vllm_config.speculative_config.draft_model_config
    dims = widths if vispec else replace(widths, has_bias=False)  # vLLM's EAGLE fc has no bias
    if vispec:  # what the plugin's speculative-config patch puts on the draft config
        checkpoint = ViSpecCheckpoint(directory=Path(draft_model_config.model), weight_file=Path("model.safetensors"),
                                      family=LLAMA, dims=dims)
        checkpoint.vispec_draft_config(attention_head_sizes(), adaptive_schedule=False).store_in(
            draft_model_config.hf_config)
    shapes = published_shapes(dims) if vispec else eagle_shapes(dims)
    generator = torch.Generator().manual_seed(0)
    with set_default_torch_dtype(draft_model_config.dtype), torch.device("cpu"):
        model = initialize_model(vllm_config, model_class=ViSpecDraftModel if vispec else EagleLlamaForCausalLM,
                                 model_config=draft_model_config)
    model.load_weights((name, torch.randn(shape, generator=generator) * 0.02) for name, shape in shapes.items())
    process_weights_after_loading(model, draft_model_config, torch.device("cpu"))
    (attention,) = (m for m in model.modules() if isinstance(m, Attention))
    return model.eval(), attention


class DraftUnderTest:
    """A draft module with its config, KV cache and per-row-set attention metadata."""

    def __init__(self, vllm_config, widths: DraftDims, vispec: bool, max_blocks: int) -> None:
        import torch

        self.vllm_config, self.vispec = vllm_config, vispec
        self.model, self.attention = build_draft(vllm_config, widths, vispec)
        self.spec = self.attention.get_kv_cache_spec(vllm_config)
        dtype = vllm_config.model_config.dtype
        # The CPU backend's layout: [blocks, KV heads, block size, keys then values of a head].
        kv_cache = torch.randn(max_blocks, self.spec.num_kv_heads, BLOCK_SIZE, 2 * self.spec.head_size).to(dtype)
        self.attention.bind_kv_cache(kv_cache)
        self.builder = self.attention.get_attn_backend().get_builder_cls()(
            self.spec, [self.attention.layer_name], vllm_config, torch.device("cpu"))

    def prepare(self, rows: RowSet, inputs: dict):
        """Attention metadata for `rows` and, for ViSpec, its row buffers filled as the proposer fills them."""
        import torch
        from vllm.v1.attention.backend import CommonAttentionMetadata

        from vispec_vllm.proposer_state import CompressedImage, image_tables
        from vispec_vllm.row_plan import ImageSpan, dropped_key_blocks, key_block_index, plan_rows

        requests, per_request = rows.requests, rows.rows_per_request
        num_rows = requests * per_request
        seq_len = rows.context + per_request
        blocks_per_request = -(-seq_len // BLOCK_SIZE)
        block_table = torch.arange(requests * blocks_per_request, dtype=torch.int32).view(requests, blocks_per_request)
        positions = inputs["positions"]
        request = torch.arange(requests).repeat_interleave(per_request)
        slot_mapping = (block_table[request, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE)
        query_start = torch.arange(requests + 1, dtype=torch.int32) * per_request
        seq_lens = torch.full((requests,), seq_len, dtype=torch.int32)
        read_table = block_table
        if self.vispec and rows.context > rows.text_before_image + rows.image_tokens:
            # Every query lies past the image: the draft's attention skips the KV blocks of dropped
            # image rows, as the proposer has it read them (ViSpecProposerState.key_blocks_read).
            image = ImageSpan(rows.text_before_image, rows.image_tokens)
            dropped = dropped_key_blocks([image], self.model.num_q, BLOCK_SIZE)
            index, skipped = key_block_index([dropped] * requests, blocks_per_request)
            read_table = block_table.gather(1, torch.from_numpy(index)).to(block_table.dtype)
            seq_lens = seq_lens - torch.from_numpy(skipped * BLOCK_SIZE).to(seq_lens.dtype)
        common = CommonAttentionMetadata(
            query_start_loc=query_start, query_start_loc_cpu=query_start,
            seq_lens=seq_lens, num_reqs=requests,
            num_actual_tokens=num_rows, max_query_len=per_request, max_seq_len=seq_len,
            block_table_tensor=read_table, slot_mapping=slot_mapping)
        self.metadata = {self.attention.layer_name: self.builder.build(0, common)}
        self.slot_mapping = {self.attention.layer_name: slot_mapping}
        if self.vispec:
            draft = self.model
            images = [ImageSpan(rows.text_before_image, rows.image_tokens, r) for r in range(requests)]
            plan = plan_rows(images, draft.num_q, query_start, torch.full((requests,), rows.context))
            tokens, term = draft.compress_image(inputs["image_embeds"])
            global_image_terms, compressed_tokens = image_tables([CompressedImage(tokens, term)] * requests,
                                                                 draft.num_q - 1, draft.hidden_size, term.dtype,
                                                                 term.device)
            draft.set_planned_rows(global_image_terms, plan.global_feature_source % len(global_image_terms),
                                   compressed_tokens, plan.compressed_index % len(compressed_tokens),
                                   plan.compressed_index >= 0, plan.is_dropped)

    @property
    def ran_compiled(self) -> bool:
        """The draft's body (the `@support_torch_compile` module) ran compiled."""
        body = self.model.model
        return not body.do_not_compile and body.compiled

    def forward(self, inputs: dict) -> None:
        from vllm.forward_context import set_forward_context

        with set_forward_context(self.metadata, self.vllm_config, num_tokens=inputs["input_ids"].shape[0],
                                 slot_mapping=self.slot_mapping):
            self.model(inputs["input_ids"], inputs["positions"], inputs["hidden_states"])


def row_inputs(rows: RowSet, widths: DraftDims, dtype) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1)
    num_rows = rows.requests * rows.rows_per_request
    positions = rows.context + torch.arange(rows.rows_per_request).repeat(rows.requests)
    return {"input_ids": torch.randint(widths.vocab_size, (num_rows,), generator=generator),
            "positions": positions,
            "hidden_states": torch.randn(num_rows, widths.hidden_size, generator=generator).to(dtype),
            "image_embeds": torch.randn(rows.image_tokens, widths.hidden_size, generator=generator).to(dtype)}


def init_single_process_distributed(vllm_config) -> None:
    """vLLM's process groups for one process (world size 1, gloo), as its CPU worker sets them up;
    once per process."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        ensure_model_parallel_initialized(1, 1)


def measure_forward(widths: DraftDims, sets: list[RowSet], modes: list[str], dtypes: list[str], forwards: int,
                    warmup: int = 3) -> list[dict]:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers import rotary_embedding

    max_blocks = max(r.requests * -(-(r.context + r.rows_per_request) // BLOCK_SIZE) for r in sets)
    rows_out = []
    for mode in modes:
        # vLLM keeps one rotary module per shape for the whole process (`get_rope`'s cache), and a
        # module picks its kernel (the CPU custom op or native torch) under the config it was built
        # in: a compiled draft must not reuse one built for an eager draft before it.
        rotary_embedding._ROPE_DICT.clear()
        for dtype in dtypes:
            with tempfile.TemporaryDirectory() as tmp:
                drafts = {}
                for name in ("vispec", "eagle"):
                    config = engine_config(Path(tmp) / name, widths, dtype, mode)
                    init_single_process_distributed(config)
                    with set_current_vllm_config(config):
                        drafts[name] = DraftUnderTest(config, widths, name == "vispec", max_blocks)
            torch_dtype = drafts["eagle"].vllm_config.model_config.dtype
            compilation = drafts["eagle"].vllm_config.compilation_config
            for rows in sets:
                inputs = row_inputs(rows, widths, torch_dtype)
                times = {name: [] for name in drafts}
                with torch.inference_mode():
                    for draft in drafts.values():
                        with set_current_vllm_config(draft.vllm_config):
                            draft.prepare(rows, inputs)
                            for _ in range(warmup):
                                draft.forward(inputs)
                    for call in range(forwards):
                        order = list(drafts) if call % 2 == 0 else list(reversed(drafts))
                        for name in order:
                            with set_current_vllm_config(drafts[name].vllm_config):
                                started = time.perf_counter()
                                drafts[name].forward(inputs)
                                times[name].append((time.perf_counter() - started) * 1e3)
                if mode == "compiled" and not all(d.ran_compiled for d in drafts.values()):
                    raise RuntimeError(f"compiled mode: a draft's body did not compile ({rows.name})")
                row = {"part": "micro", "mode": mode, "dtype": dtype, "rows": rows.name, "requests": rows.requests,
                       "rows_per_request": rows.rows_per_request, "context": rows.context,
                       "num_rows": rows.requests * rows.rows_per_request, "forwards": forwards,
                       "vispec_head_size": drafts["vispec"].spec.head_size,
                       "eagle_head_size": drafts["eagle"].spec.head_size,
                       "compilation": f"{compilation.mode.name}, {compilation.backend}" if mode == "compiled" else None}
                row |= spread_fields("vispec_ms", times["vispec"]) | spread_fields("eagle_ms", times["eagle"])
                row["ratio"] = row["vispec_ms"] / row["eagle_ms"]
                rows_out.append(row)
                print(f"micro {mode:8s} {dtype:8s} {rows.name:22s} rows={row['num_rows']:4d}: ViSpec "
                      f"{row['vispec_ms']:8.2f} ms, EAGLE {row['eagle_ms']:8.2f} ms, ratio {row['ratio']:.3f}",
                      flush=True)
            del drafts
    return rows_out


# --------------------------------------------------------------------------------------------
# B. ITL in vLLM serving


def measure_itl(args: argparse.Namespace, modes: list[str]) -> list[dict]:
    """ITL p50 of the ViSpec draft (fixed K) and the EAGLE draft of the demo pair, servers side by side."""
    from serve_concurrency import SERVER_ARGS, fixed_setup, run_interleaved, speculation_setups

    setups = speculation_setups(args.vispec, str(args.eagle), K, [K], K)
    vispec_fixed = fixed_setup(K)
    rows = []
    for mode in modes:
        server_args = SERVER_ARGS if mode == "eager" else [a for a in SERVER_ARGS if a != "--enforce-eager"]
        started = time.monotonic()
        results = run_interleaved(args, {name: (server_args + setups[name].serve_args, setups[name].env)
                                         for name in (vispec_fixed, "eagle")}, started)
        for concurrency in args.concurrency:
            itl = {name: [r["median_itl_ms"] for r in results[(name, concurrency)]]
                   for name in (vispec_fixed, "eagle")}
            row = {"part": "itl", "mode": mode, "concurrency": concurrency, "repeats": args.repeats,
                   "server_args": server_args}
            row |= spread_fields("vispec_itl_ms_p50", itl[vispec_fixed])
            row |= spread_fields("eagle_itl_ms_p50", itl["eagle"])
            row["ratio"] = row["vispec_itl_ms_p50"] / row["eagle_itl_ms_p50"]
            row["vispec_itl_ms_p50_repeats"], row["eagle_itl_ms_p50_repeats"] = itl[vispec_fixed], itl["eagle"]
            rows.append(row)
            print(f"itl {mode:8s} c={concurrency:3d}: ViSpec {row['vispec_itl_ms_p50']:.2f} ms, EAGLE "
                  f"{row['eagle_itl_ms_p50']:.2f} ms, ratio {row['ratio']:.3f}", flush=True)
    return rows


def keep_other_part(report: dict, previous_path: Path, part: str) -> dict:
    """`report` of one part, with the other part's settings and rows carried over from the report
    at `previous_path` (when there is one, of the same kind: smoke or not). `command` then names
    every command that measured a row of the result."""
    other = "itl" if part == "micro" else "micro"
    if not previous_path.exists():
        return report
    previous = json.loads(previous_path.read_text())
    if previous.get("smoke") != report["smoke"] or other not in previous:
        return report
    # Reports from before each part recorded its own command share the top-level one.
    other_settings = {"command": previous["command"]} | previous[other]
    merged = {key: value for key, value in report.items() if key != "rows"}
    merged[other] = other_settings
    merged["command"] = " ; ".join(dict.fromkeys((merged["micro"]["command"], merged["itl"]["command"])))
    merged["rows"] = ([row for row in report["rows"] if row["part"] == "micro"]
                      + [row for row in previous["rows"] if row["part"] == other]
                      + [row for row in report["rows"] if row["part"] == "itl"])
    return merged


def main() -> None:
    from vispec_vllm.demo.models import DEMO_PAIRS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("micro", "itl", "both"), default="both")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager (--enforce-eager / no compilation) and compiled (vLLM's default on CPU)")
    parser.add_argument("--micro-modes", nargs="+", choices=MODES,
                        help="the micro part's modes, when they differ from --modes")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                        help="micro: the drafts' dtypes")
    parser.add_argument("--forwards", type=int, default=30, help="micro: timed forwards per draft and row set")
    parser.add_argument("--repeats", type=int, default=5, help="itl: interleaved repeats per server and concurrency")
    parser.add_argument("--image-tokens", type=int, default=576, choices=sorted(DEMO_PAIRS),
                        help="itl: which shipped demo pair (its target, `vispec` and `eagle` drafts and scenes)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts-per-concurrency", type=int, default=4,
                        help="itl: requests per run = this x concurrency (at least 4 x this)")
    parser.add_argument("--min-prompts", type=int, help="itl: requests per run at least (default: 4 x "
                        "--prompts-per-concurrency)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup-prompts", type=int, default=8, help="itl: requests of each server's warm-up run")
    parser.add_argument("--seed", type=int, default=0, help="itl: picks the held-out scenes")
    parser.add_argument("--server-logs", type=Path,
                        help="itl: keep each server's log in this directory (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny widths and the 36-token pair, for tests: "
                             + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    parser.add_argument("--out", type=Path, default=RESULTS / "step_cost.json")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    args.target, drafts = DEMO_PAIRS[args.image_tokens]
    args.vispec, args.eagle = drafts["vispec"], drafts["eagle"]
    widths, sets = (SMOKE_WIDTHS, SMOKE_ROW_SETS) if args.smoke else (LLAVA_1_5_7B, ROW_SETS)

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    report = {"machine": machine_description(), "command": command, "num_speculative_tokens": K,
              "smoke": args.smoke, "rows": []}
    started = time.monotonic()
    if args.part in ("micro", "both"):
        report["micro"] = {"command": command, "widths": asdict(widths), "block_size": BLOCK_SIZE,
                           "row_sets": [asdict(r) for r in sets]}
        report["rows"] += measure_forward(widths, sets, args.micro_modes or args.modes, args.dtypes, args.forwards)
    if args.part in ("itl", "both"):
        report["itl"] = {"command": command, "target": args.target.name, "vispec": args.vispec.name,
                         "eagle": args.eagle.name, "output_len": args.output_len,
                         "prompts_per_concurrency": args.prompts_per_concurrency,
                         "warmup_prompts": args.warmup_prompts, "seed": args.seed}
        report["rows"] += measure_itl(args, args.modes)
    report["duration_s"] = round(time.monotonic() - started, 1)
    if args.part != "both":
        report = keep_other_part(report, args.out, args.part)
    write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

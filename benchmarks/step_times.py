"""Step times at real model shapes, in plain PyTorch (bf16 on a GPU): one target decode/verify
step, one ViSpec draft step (img_fc + fc + decoder layer + LM head + argmax) captured and eager,
one plain EAGLE-style draft step, and the vision adaptor over one image's tokens, at batch 1..64.

    python benchmarks/step_times.py --out benchmarks/results/step_times_h100.json   # on a GPU
    python benchmarks/step_times.py --targets tiny --device cpu --out /tmp/st.json  # smoke test

It needs only torch (vLLM cannot be installed on the lent GPU machines), so it models vLLM's
step rather than running it. What it leaves out, and why the numbers are still the ones the
cost model needs: weights are random bf16 (speed does not depend on values); RoPE, sampling and
the scheduler are left out (small elementwise work / host work, which the cost model carries as a
per-step overhead); attention is torch SDPA (flash) over one contiguous KV cache per layer rather
than vLLM's paged FlashAttention, with query heads grouped per KV head so GQA reads each KV head
once. Every layer has its own weights and each layer reads a full KV cache, so the traffic per
step is the real one. On CUDA each measured call is captured as a CUDA graph (as vLLM does) and
timed over replays with CUDA events; the median is reported.

Writes {"device", "torch", "dtype", "cuda_graphs", "complete", "targets": {...shapes...},
"measurements": [{"target", "language_model", "part", "batch", "query_tokens", "context", "ms_p50", "ms_p10",
"ms_p90", "reps"}]}; `part` is target_step | vispec_draft_step | eagle_draft_step | vispec_draft_step_eager | adaptor
(adaptor rows: batch = images, query_tokens = num_q, context = tokens per image).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

# The shapes (benchmarks/target_shapes.py, on the plugin's pure-Python cost model) need no vLLM;
# the checkout's root makes the plugin's package importable where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from target_shapes import TARGETS, TINY_TARGET, TargetShape  # noqa: E402

from vispec_vllm.cost_model import LanguageModelShape  # noqa: E402

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
QUERY_TOKENS = [1, 2, 4, 6]  # verify K+1 tokens per request: K = 0, 1, 3, 5
ADAPTOR_IMAGE_TOKENS = [576, 1024, 2880]
NUM_Q = 2
PARTS = ("target_step", "vispec_draft_step", "eagle_draft_step", "vispec_draft_step_eager", "adaptor")


def random_weight(*shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device=device, dtype=dtype).normal_(std=0.02)


class DecoderLayerWeights:
    """One Llama/Qwen2 decoder layer, fused like vLLM's (qkv, gate_up)."""

    def __init__(self, shape: LanguageModelShape, device: str, dtype: torch.dtype):
        h, hd = shape.hidden_size, shape.head_dim
        self.shape = shape
        qkv_out = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * hd
        self.input_norm = torch.ones(h, device=device, dtype=dtype)
        self.qkv = random_weight(qkv_out, h, device=device, dtype=dtype)
        self.qkv_bias = random_weight(qkv_out, device=device, dtype=dtype) if shape.qkv_bias else None
        self.o = random_weight(h, shape.num_attention_heads * hd, device=device, dtype=dtype)
        self.post_norm = torch.ones(h, device=device, dtype=dtype)
        self.gate_up = random_weight(2 * shape.intermediate_size, h, device=device, dtype=dtype)
        self.down = random_weight(h, shape.intermediate_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: int, query: int,
                context: int) -> torch.Tensor:
        s = self.shape
        hd, nh, nkv = s.head_dim, s.num_attention_heads, s.num_key_value_heads
        group = nh // nkv
        h = F.rms_norm(x, (s.hidden_size,), self.input_norm)
        qkv = F.linear(h, self.qkv, self.qkv_bias)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        # New keys/values land at the end of each request's context.
        k_cache[:batch, :, context - query:context].copy_(k.view(batch, query, nkv, hd).transpose(1, 2))
        v_cache[:batch, :, context - query:context].copy_(v.view(batch, query, nkv, hd).transpose(1, 2))
        # Grouped query heads become extra query rows of their KV head: GQA without repeating KV.
        q = q.view(batch, query, nkv, group, hd).permute(0, 2, 3, 1, 4).reshape(batch, nkv, group * query, hd)
        attn = F.scaled_dot_product_attention(q, k_cache[:batch, :, :context], v_cache[:batch, :, :context])
        attn = attn.view(batch, nkv, group, query, hd).permute(0, 3, 1, 2, 4).reshape(batch * query, nh * hd)
        x = x + F.linear(attn, self.o)
        h = F.rms_norm(x, (s.hidden_size,), self.post_norm)
        gate, up = F.linear(h, self.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)


class StepModels:
    """A target's language model, its ViSpec draft and adaptor, with random weights."""

    def __init__(self, shape: LanguageModelShape, max_context: int, device: str, dtype: torch.dtype):
        self.shape, self.device, self.dtype = shape, device, dtype
        h = shape.hidden_size
        self.layers = [DecoderLayerWeights(shape, device, dtype) for _ in range(shape.num_layers)]
        self.final_norm = torch.ones(h, device=device, dtype=dtype)
        self.lm_head = random_weight(shape.vocab_size, h, device=device, dtype=dtype)
        self.draft_layer = DecoderLayerWeights(shape.draft_layer(), device, dtype)
        self.fc = random_weight(h, 2 * h, device=device, dtype=dtype)
        self.img_fc = random_weight(h, 2 * h, device=device, dtype=dtype)
        self.adaptor_queries = random_weight(NUM_Q, shape.num_attention_heads, shape.head_dim, device=device,
                                             dtype=dtype)
        self.adaptor_kv = random_weight(2 * h, h, device=device, dtype=dtype)
        self.adaptor_o = random_weight(h, h, device=device, dtype=dtype)
        kv_shape = (max(BATCH_SIZES), shape.num_key_value_heads, max_context, shape.head_dim)
        self.k_cache = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(kv_shape, device=device, dtype=dtype)
        draft_kv_shape = (max(BATCH_SIZES), shape.num_attention_heads, max_context, shape.head_dim)
        self.draft_k_cache = torch.zeros(draft_kv_shape, device=device, dtype=dtype)
        self.draft_v_cache = torch.zeros(draft_kv_shape, device=device, dtype=dtype)

    def hidden(self, tokens: int) -> torch.Tensor:
        return torch.randn(tokens, self.shape.hidden_size, device=self.device, dtype=self.dtype)

    def target_step(self, batch: int, query: int, context: int) -> Callable[[], torch.Tensor]:
        x = self.hidden(batch * query)

        def step() -> torch.Tensor:
            h = x
            for layer in self.layers:
                h = layer.forward(h, self.k_cache, self.v_cache, batch, query, context)
            h = F.rms_norm(h, (self.shape.hidden_size,), self.final_norm)
            return F.linear(h, self.lm_head).argmax(dim=-1)

        return step

    def draft_step(self, batch: int, query: int, context: int, vispec: bool) -> Callable[[], torch.Tensor]:
        embeddings, target_hidden, global_image_feature = (self.hidden(batch * query) for _ in range(3))

        def step() -> torch.Tensor:
            h = target_hidden
            if vispec:
                h = F.linear(torch.cat([h, global_image_feature], dim=-1), self.img_fc)
            h = F.linear(torch.cat([embeddings, h], dim=-1), self.fc)
            h = self.draft_layer.forward(h, self.draft_k_cache, self.draft_v_cache, batch, query, context)
            h = F.rms_norm(h, (self.shape.hidden_size,), self.final_norm)
            return F.linear(h, self.lm_head).argmax(dim=-1)

        return step

    def adaptor(self, images: int, image_tokens: int) -> Callable[[], torch.Tensor]:
        s = self.shape
        image_embeddings = self.hidden(images * image_tokens).view(images, image_tokens, s.hidden_size)
        queries = self.adaptor_queries.transpose(0, 1).unsqueeze(0).expand(images, -1, -1, -1)

        def step() -> torch.Tensor:
            k, v = F.linear(image_embeddings, self.adaptor_kv).chunk(2, dim=-1)
            k = k.view(images, image_tokens, s.num_attention_heads, s.head_dim).transpose(1, 2)
            v = v.view(images, image_tokens, s.num_attention_heads, s.head_dim).transpose(1, 2)
            attn = F.scaled_dot_product_attention(queries, k, v)
            return F.linear(attn.transpose(1, 2).reshape(images, NUM_Q, s.hidden_size), self.adaptor_o)

        return step


def cuda_event_times(run: Callable[[], object], reps: int) -> list[float]:
    """Milliseconds of each of `reps` back-to-back calls, from CUDA events around each."""
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_call(step: Callable[[], torch.Tensor], device: str, target_s: float = 0.25, graph: bool = True) -> dict:
    """Median time of one call; on CUDA, of one replay of the call captured as a CUDA graph
    (graph=False: of one eager call, launches included, as vLLM runs the ViSpec draft)."""
    if device == "cuda" and not graph:
        for _ in range(3):
            step()
        times = cuda_event_times(step, 50)
    elif device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
        run()
        torch.cuda.synchronize()
        probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        probe_start.record()
        run()
        probe_end.record()
        torch.cuda.synchronize()
        reps = int(min(100, max(10, target_s * 1e3 / max(probe_start.elapsed_time(probe_end), 1e-3))))
        times = cuda_event_times(run, reps)
        del graph
    else:
        step()
        probe = time.perf_counter()
        step()
        reps = int(min(50, max(5, target_s / max(time.perf_counter() - probe, 1e-6))))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"ms_p50": statistics.median(times), "ms_p10": times[len(times) // 10],
            "ms_p90": times[min(len(times) - 1, (9 * len(times)) // 10)], "reps": len(times)}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()} CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), help=f"{list(TARGETS)} or tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=BATCH_SIZES)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop measuring after this long")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    targets = [TINY_TARGET if name == "tiny" else TARGETS[name] for name in args.targets]
    report = {"device": device_name(args.device), "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
              "cuda_graphs": args.device == "cuda", "complete": False,
              "targets": {t.name: {"language_model": asdict(t.language_model), "image_tokens": t.image_tokens,
                                   "decode_context": t.decode_context} for t in targets},
              "measurements": []}
    started = time.monotonic()

    def record(target: TargetShape, part: str, batch: int, query: int, context: int, step) -> bool:
        if part not in args.parts:
            return True
        if time.monotonic() - started > args.budget_s:
            return False
        timing = time_call(step, args.device, graph=not part.endswith("_eager"))
        row = {"target": target.name, "language_model": target.language_model.name, "part": part, "batch": batch,
               "query_tokens": query, "context": context, **timing}
        report["measurements"].append(row)
        print(json.dumps(row), flush=True)
        return True

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    # Targets that share a language model share its weights (LLaVA-1.5 and 1.6 differ in context).
    by_language_model: dict[str, list] = {}
    for target in targets:
        by_language_model.setdefault(target.language_model.name, []).append(target)
    within_budget = True
    with torch.inference_mode():
        for group in by_language_model.values():
            shape = group[0].language_model
            models = StepModels(shape, max(t.decode_context for t in group) + max(QUERY_TOKENS), args.device, dtype)
            for target in group:
                context = target.decode_context
                for batch in args.batch_sizes:
                    for query in QUERY_TOKENS:
                        within_budget &= record(target, "target_step", batch, query, context,
                                                models.target_step(batch, query, context))
                        within_budget &= record(target, "vispec_draft_step", batch, query, context,
                                                models.draft_step(batch, query, context, vispec=True))
                    within_budget &= record(target, "eagle_draft_step", batch, 1, context,
                                            models.draft_step(batch, 1, context, vispec=False))
                    within_budget &= record(target, "vispec_draft_step_eager", batch, 1, context,
                                            models.draft_step(batch, 1, context, vispec=True))
            for images in args.batch_sizes:
                for image_tokens in ADAPTOR_IMAGE_TOKENS if args.device == "cuda" else [group[0].image_tokens]:
                    within_budget &= record(group[0], "adaptor", images, NUM_Q, image_tokens,
                                            models.adaptor(images, image_tokens))
            del models
            if args.device == "cuda":
                torch.cuda.empty_cache()
            write()
    report["complete"] = within_budget
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    write()
    print(f"wrote {args.out} ({len(report['measurements'])} measurements, complete={within_budget}, "
          f"{report['elapsed_s']} s)")


if __name__ == "__main__":
    main()

"""The cost model (vispec_vllm/cost_model.py) fitted to and checked against every measurement the
project has, and its predictions for real targets on H100 and H200.

    python benchmarks/cost_model.py          # writes benchmarks/results/cost_model.{json,png}

1. GPU step times (benchmarks/results/step_times_h100.json, step_times_h200.json; PyTorch, bf16,
   CUDA graphs): the bandwidth and compute efficiencies and the per-layer overhead are fitted to
   the H100 target and draft steps, the eager draft's launch overhead to step_times_h100_eager.json;
   the H200 steps are predicted with the same constants and the H200's spec-sheet bandwidth (held
   out). Adaptor rows are predicted, not fitted. vLLM's own host work per step is an assumption
   (Hardware.step_overhead_s): vLLM cannot run on the lent GPU machines.
2. This machine (benchmarks/results/serve_concurrency.json, vllm bench serve on the demo pair):
   the step and per-token overheads are fitted to the runs without speculation, the draft-forward
   overhead to ViSpec at a fixed K; the plain EAGLE-style and load-adaptive ViSpec runs are
   predicted (held out). Each row is predicted at the batch the engine really ran (its mean
   running requests) with the row's measured mean acceptance length.
3. Predictions of decode tokens/s at batch 1..64 for LLaVA-1.5/1.6 7B/13B and Qwen2.5-VL 3B/7B on
   H100 and H200, without speculation, with ViSpec at K=3 and with the load-adaptive schedule the
   plugin derives, for two acceptance curves: the demo pair's measured one (benchmarks/results/
   acceptance.json) and the plugin's start-up assumption. Prefill is left out.

The fitted constants are the ones in vispec_vllm/cost_model.py; `--check` exits non-zero if a
refit disagrees with them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, pyplot  # noqa: E402
from serve_concurrency import setup_name  # noqa: E402
from target_shapes import TARGETS  # noqa: E402

from vispec_vllm.cost_model import (  # noqa: E402
    H100,
    H200,
    THIS_CPU,
    AcceptanceCurve,
    Hardware,
    LanguageModelShape,
    derive_schedule,
    draft_forward_time,
    step_time,
    target_forward_time,
    tokens_per_second,
)
from vispec_vllm.speculation_schedule import DEFAULT_ACCEPTANCE_RATE  # noqa: E402

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
# The demo pair's requests: 37 image tokens + the question, ~67 answer tokens.
DEMO_CONTEXT = 120
PREDICTION_K = 3
CPU_FITTED_FIELDS = ("step_overhead_s", "per_request_overhead_s", "per_token_overhead_s", "draft_forward_overhead_s")


# --------------------------------------------------------------------------------------------
# 1. GPU step times


def adaptor_time(hardware: Hardware, shape: LanguageModelShape, images: int, image_tokens: int) -> float:
    """The vision adaptor over `images` images (prefill only): k/v projections of every image
    token, cross-attention of 2 learned queries, and o_proj."""
    h = shape.hidden_size
    bandwidth = hardware.memory_bandwidth * hardware.bandwidth_efficiency
    flops = hardware.matmul_flops * hardware.compute_efficiency
    activations = images * image_tokens * h * 3  # image embeddings in, keys and values out
    bytes_moved = (3 * h * h + activations) * hardware.bytes_per_param
    return max(bytes_moved / bandwidth, 2 * 2 * h * h * images * image_tokens / flops)


def predicted_step_ms(hardware: Hardware, shape: LanguageModelShape, row: dict) -> float:
    b, q, context = row["batch"], row["query_tokens"], row["context"]
    part = row["part"]
    if part == "target_step":
        seconds = target_forward_time(hardware, shape, b, q, context)
    elif part in ("vispec_draft_step", "eagle_draft_step"):
        seconds = draft_forward_time(hardware, shape, b, q, context, vispec=part == "vispec_draft_step")
    else:
        seconds = adaptor_time(hardware, shape, b, context)
    return seconds * 1e3


def load_step_times(path: Path) -> tuple[dict, list[tuple[LanguageModelShape, dict]]]:
    report = json.loads(path.read_text())
    shapes = {name: LanguageModelShape(**t["language_model"]) for name, t in report["targets"].items()}
    return report, [(shapes[row["target"]], row) for row in report["measurements"]]


def fit_gpu(rows: list[tuple[LanguageModelShape, dict]], base: Hardware) -> Hardware:
    """Grid search of (bandwidth efficiency, compute efficiency, per-layer overhead) minimising the
    mean squared log error over the target and draft steps."""
    fitted = [(s, r) for s, r in rows if r["part"] != "adaptor"]
    measured = np.array([r["ms_p50"] for _, r in fitted])
    layers = np.array([s.num_layers if r["part"] == "target_step" else 1 for s, r in fitted], dtype=float)
    # Each row's roofline terms at efficiency 1 (ms): weights/KV bytes and GEMM/attention FLOPs.
    unit = replace(base, bandwidth_efficiency=1.0, compute_efficiency=1.0, layer_overhead_s=0.0)
    memory_only = replace(unit, matmul_flops=math.inf)
    compute_only = replace(unit, memory_bandwidth=math.inf)

    def split(hardware, shape, row, kv_only):
        # forward_time = weights term + attention term; separate them by zeroing the context.
        full = predicted_step_ms(hardware, shape, row)
        no_kv = predicted_step_ms(hardware, shape, {**row, "context": 0})
        return full - no_kv if kv_only else no_kv

    weight_bytes = np.array([split(memory_only, s, r, False) for s, r in fitted])
    weight_flops = np.array([split(compute_only, s, r, False) for s, r in fitted])
    kv_bytes = np.array([split(memory_only, s, r, True) for s, r in fitted])
    attention_flops = np.array([split(compute_only, s, r, True) for s, r in fitted])
    overheads_us = np.arange(0, 151)
    best = (math.inf, None)
    for bw_eff, fl_eff in itertools.product(np.arange(40, 101) / 100, np.arange(20, 101) / 100):
        roofline = (np.maximum(weight_bytes / bw_eff, weight_flops / fl_eff)
                    + np.maximum(kv_bytes / bw_eff, attention_flops / fl_eff))
        predicted = roofline[None, :] + layers[None, :] * overheads_us[:, None] * 1e-3
        loss = np.mean(np.log(predicted / measured[None, :]) ** 2, axis=1)
        i = int(np.argmin(loss))
        if loss[i] < best[0]:
            best = (loss[i], (float(bw_eff), float(fl_eff), float(overheads_us[i]) * 1e-6))
    bw_eff, fl_eff, overhead = best[1]
    return replace(base, bandwidth_efficiency=bw_eff, compute_efficiency=fl_eff, layer_overhead_s=overhead)


def fit_draft_forward_overhead(rows: list[tuple[LanguageModelShape, dict]]) -> float:
    """Median extra time of an eager draft step over the same step captured as a graph (seconds,
    to the microsecond): the launch cost the ViSpec draft pays for running eager."""
    captured = {(r["target"], r["batch"]): r["ms_p50"] for _, r in rows
                if r["part"] == "vispec_draft_step" and r["query_tokens"] == 1}
    extra = sorted(r["ms_p50"] - captured[(r["target"], r["batch"])] for _, r in rows
                   if r["part"] == "vispec_draft_step_eager")
    return round(extra[len(extra) // 2] * 1e3) * 1e-6


def step_time_errors(hardware: Hardware, rows: list[tuple[LanguageModelShape, dict]]) -> list[dict]:
    out = []
    for shape, row in rows:
        predicted = predicted_step_ms(hardware, shape, row)
        out.append({key: row[key] for key in ("target", "part", "batch", "query_tokens", "context")}
                   | {"measured_ms": row["ms_p50"], "predicted_ms": predicted,
                      "error": predicted / row["ms_p50"] - 1})
    return out


def summarise(errors: list[float]) -> dict:
    absolute = sorted(abs(e) for e in errors)
    return {"n": len(absolute), "median_abs_error": absolute[len(absolute) // 2],
            "p90_abs_error": absolute[int(0.9 * (len(absolute) - 1))], "max_abs_error": absolute[-1],
            "within_20_percent": sum(e <= 0.2 for e in absolute) / len(absolute)}


# --------------------------------------------------------------------------------------------
# 2. This machine: vllm bench serve on the demo pair


def demo_target_shape(target_dir: Path) -> LanguageModelShape:
    text = json.loads((target_dir / "config.json").read_text())["text_config"]
    return LanguageModelShape.from_hf_text_config(SimpleNamespace(**text))


def serve_row_prediction(hardware: Hardware, shape: LanguageModelShape, row: dict, k: int, context: int) -> float:
    """Predicted output tokens/s of one serve row: at the engine's measured mean batch, with the
    row's measured mean acceptance length when it drafts (K > 0)."""
    batch = row["mean_running_requests"]
    tokens_per_step = batch * (row["mean_acceptance_length"] if k else 1.0)
    return tokens_per_step / step_time(hardware, shape, batch, k, context, vispec=row["mode"] == "vispec")


def serve_row_k(row: dict, fixed_k: int) -> int:
    """K of a serve row. A load-adaptive server re-derives its table from the acceptance it
    measures while it runs, so its K is the one it drafted (mean draft tokens per draft)."""
    if row["mode"] == "none" or not row["mean_acceptance_length"]:
        return 0
    return round(row["mean_draft_tokens"]) if row["adaptive"] else fixed_k


def fit_cpu(rows: list[dict], shape: LanguageModelShape, fixed_k: int, context: int) -> Hardware:
    """Least squares on relative step-time error, in two stages. Without speculation a step is
    o + (r + c) b (step overhead, per-request and per-token cost); ViSpec at a fixed K adds
    K b verified tokens and 2K b draft tokens at c each, and K draft-forward overheads, which
    separates c from r."""
    unit = replace(THIS_CPU, step_overhead_s=0.0, per_token_overhead_s=0.0, per_request_overhead_s=0.0,
                   draft_forward_overhead_s=0.0)

    def measured_and_roofline(row, k):
        batch = row["mean_running_requests"]
        tokens_per_step = batch * (row["mean_acceptance_length"] if k else 1.0)
        return tokens_per_step / row["output_tok_s"], step_time(unit, shape, batch, k, context)

    plain = [r for r in rows if r["mode"] == "none"]
    seconds, roofline = map(np.array, zip(*(measured_and_roofline(r, 0) for r in plain), strict=True))
    batch = np.array([r["mean_running_requests"] for r in plain])
    design = np.stack([1 / seconds, batch / seconds], axis=1)
    (step_overhead, per_request_and_token), *_ = np.linalg.lstsq(design, 1 - roofline / seconds, rcond=None)

    k = fixed_k
    fixed = [r for r in rows if r["mode"] == "vispec" and not r["adaptive"]]
    seconds, roofline = map(np.array, zip(*(measured_and_roofline(r, k) for r in fixed), strict=True))
    batch = np.array([r["mean_running_requests"] for r in fixed])
    rest = seconds - roofline - step_overhead - per_request_and_token * batch
    design = np.stack([np.full_like(batch, k) / seconds, 3 * k * batch / seconds], axis=1)
    (draft_overhead, per_token), *_ = np.linalg.lstsq(design, rest / seconds, rcond=None)
    return replace(unit, step_overhead_s=float(step_overhead), per_token_overhead_s=float(per_token),
                   per_request_overhead_s=float(per_request_and_token - per_token),
                   draft_forward_overhead_s=float(draft_overhead))


# --------------------------------------------------------------------------------------------
# 3. Predictions for real targets


def acceptance_from_report(path: Path, draft: str) -> AcceptanceCurve:
    rows = json.loads(path.read_text())["runs"]
    return AcceptanceCurve({r["k"]: r["mean_acceptance_length"] for r in rows
                            if r["draft"] == draft and r["prompts"] == "image"})


def gpu_predictions(acceptance: dict[str, AcceptanceCurve], source: str) -> list[dict]:
    rows = []
    for (target_name, target), hardware in itertools.product(TARGETS.items(), (H100, H200)):
        shape, context = target.language_model, target.decode_context
        schedule = derive_schedule(hardware, shape, PREDICTION_K, acceptance["vispec"], context)
        for batch in BATCH_SIZES:
            adaptive_k = next(k for first, last, k in schedule if first <= batch <= last)
            plain = tokens_per_second(hardware, shape, batch, 0, acceptance["vispec"], context)
            row = {"acceptance": source, "hardware": hardware.name, "target": target_name, "batch": batch,
                   "none_tok_s": plain}
            for name, k, vispec, curve in (("vispec", PREDICTION_K, True, acceptance["vispec"]),
                                           ("vispec_adaptive", adaptive_k, True, acceptance["vispec"]),
                                           ("eagle", PREDICTION_K, False, acceptance["eagle"])):
                rate = tokens_per_second(hardware, shape, batch, k, curve, context, vispec)
                row[f"{name}_tok_s"], row[f"{name}_ratio"] = rate, rate / plain
            row["adaptive_k"] = adaptive_k
            rows.append(row)
    return rows


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for hardware, ax in zip(("H100 SXM", "H200"), axes[:2], strict=True):
        for target in TARGETS:
            rows = [r for r in report["gpu_predictions"] if r["hardware"] == hardware and r["target"] == target
                    and r["acceptance"].startswith("demo")]
            ax.plot([r["batch"] for r in rows], [r["vispec_ratio"] for r in rows], "-o", ms=3, label=target)
        ax.set_title(f"{hardware}: predicted ViSpec (K={PREDICTION_K}) / no speculation\n"
                     "(demo pair's acceptance curve)", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for setup in dict.fromkeys(r["setup"] for r in report["this_machine"]["rows"]):
        rows = [r for r in report["this_machine"]["rows"] if r["setup"] == setup]
        line, = ax.plot([r["concurrency"] for r in rows], [r["measured_tok_s"] for r in rows], "-o", ms=3,
                        label=f"{setup} measured")
        ax.plot([r["concurrency"] for r in rows], [r["predicted_tok_s"] for r in rows], "--", color=line.get_color(),
                label=f"{setup} predicted")
    ax.set_title("this machine: vllm bench serve, demo pair", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def constants_agree(fitted: Hardware, shipped: Hardware, fields: tuple[str, ...], tolerance: float) -> list[str]:
    return [f"{shipped.name}.{f}: fitted {getattr(fitted, f):.4g}, shipped {getattr(shipped, f):.4g}"
            for f in fields if abs(getattr(fitted, f) - getattr(shipped, f)) > tolerance * abs(getattr(shipped, f))]


def main() -> None:
    from vispec_vllm.demo.models import DEMO_TARGET

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS / "cost_model.json")
    parser.add_argument("--check", action="store_true", help="fail if a refit disagrees with the shipped constants")
    args = parser.parse_args()

    report: dict = {}
    problems: list[str] = []

    # 1. GPU step times.
    h100_report, h100_rows = load_step_times(args.results / "step_times_h100.json")
    _, eager_rows = load_step_times(args.results / "step_times_h100_eager.json")
    fitted_h100 = replace(fit_gpu(h100_rows, H100), draft_forward_overhead_s=fit_draft_forward_overhead(eager_rows))
    problems += constants_agree(fitted_h100, H100, ("bandwidth_efficiency", "compute_efficiency",
                                                    "layer_overhead_s", "draft_forward_overhead_s"), 1e-6)
    report["gpu_fit"] = {"device": h100_report["device"], "bandwidth_efficiency": fitted_h100.bandwidth_efficiency,
                         "compute_efficiency": fitted_h100.compute_efficiency,
                         "layer_overhead_us": fitted_h100.layer_overhead_s * 1e6,
                         "draft_forward_overhead_us": fitted_h100.draft_forward_overhead_s * 1e6,
                         "step_overhead_us (assumed)": H100.step_overhead_s * 1e6}
    report["step_times"] = {}
    for name, hardware, role in (("step_times_h100.json", H100, "fitted"), ("step_times_h200.json", H200, "held out")):
        measured_report, rows = load_step_times(args.results / name)
        errors = step_time_errors(hardware, rows)
        report["step_times"][name] = {
            "device": measured_report["device"], "role": role,
            "summary": {part: summarise([e["error"] for e in errors if e["part"] == part])
                        for part in dict.fromkeys(e["part"] for e in errors)},
            "rows": errors}

    acceptance = {draft: acceptance_from_report(args.results / "acceptance.json", draft)
                  for draft in ("vispec", "eagle")}

    # 2. This machine.
    serve = json.loads((args.results / "serve_concurrency.json").read_text())
    shape, context = demo_target_shape(DEMO_TARGET), DEMO_CONTEXT
    fixed_k = 3
    fitted_cpu = fit_cpu(serve["runs"], shape, fixed_k, context)
    problems += constants_agree(fitted_cpu, THIS_CPU, CPU_FITTED_FIELDS, 0.02)
    cpu_schedule = derive_schedule(THIS_CPU, shape, fixed_k, acceptance["vispec"], context)
    machine_rows = []
    for row in serve["runs"]:
        k = serve_row_k(row, fixed_k)
        predicted = serve_row_prediction(THIS_CPU, shape, row, k, context)
        setup = setup_name(row)
        fitted = setup == "none" or setup.startswith("vispec-fixed")  # what fit_cpu fits: no draft, fixed K
        machine_rows.append({"setup": setup, "role": "fitted" if fitted else "held out",
                             "concurrency": row["concurrency"], "mean_running_requests": row["mean_running_requests"],
                             "k": k, "measured_tok_s": row["output_tok_s"], "predicted_tok_s": predicted,
                             "error": predicted / row["output_tok_s"] - 1})
    report["this_machine"] = {
        "machine": serve["machine"],
        "fitted": {f"{field[:-2]}_ms": getattr(fitted_cpu, field) * 1e3 for field in CPU_FITTED_FIELDS},
        "derived_schedule_k3": cpu_schedule,
        "summary": {role: summarise([r["error"] for r in machine_rows if r["role"] == role])
                    for role in ("fitted", "held out")},
        "rows": machine_rows}

    # 3. Real targets.
    assumed = AcceptanceCurve.geometric(DEFAULT_ACCEPTANCE_RATE, max_k=PREDICTION_K)
    report["gpu_predictions"] = (
        gpu_predictions(acceptance, "demo pair, measured (benchmarks/results/acceptance.json, image prompts)")
        + gpu_predictions({"vispec": assumed, "eagle": assumed},
                          f"assumed per-position rate {DEFAULT_ACCEPTANCE_RATE} (the plugin's start-up assumption)"))
    report["derived_schedules_k3"] = {
        f"{hardware.name} / {name}": derive_schedule(hardware, t.language_model, PREDICTION_K, acceptance["vispec"],
                                                     t.decode_context)
        for hardware, (name, t) in itertools.product((H100, H200), TARGETS.items())}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    for name, block in report["step_times"].items():
        for part, summary in block["summary"].items():
            print(f"{name} ({block['role']}) {part}: median |err| {summary['median_abs_error']:.1%}, "
                  f"max {summary['max_abs_error']:.1%}, within 20%: {summary['within_20_percent']:.0%}")
    for role, summary in report["this_machine"]["summary"].items():
        print(f"this machine ({role}): median |err| {summary['median_abs_error']:.1%}, "
              f"max {summary['max_abs_error']:.1%}, within 20%: {summary['within_20_percent']:.0%}")
    print(f"fitted H100: {report['gpu_fit']}\nfitted CPU: {report['this_machine']['fitted']}")
    print(f"wrote {args.out}")
    if problems:
        print("shipped constants disagree with the refit:\n  " + "\n  ".join(problems))
        if args.check:
            sys.exit(1)


if __name__ == "__main__":
    main()

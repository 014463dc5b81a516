"""Where a speculative step's time goes: wall time per engine step in each phase of vLLM's model
runner, with and without speculation, one request at a time.

    python benchmarks/step_breakdown.py                  # the default pair: none, ViSpec and EAGLE-style at K=5
    python benchmarks/step_breakdown.py --target DIR --vispec DIR --eagle "" --repeats 1 --num-requests 2 \\
        --max-tokens 8 --out FILE                        # any pair (tests: tiny models)

How it measures:
- In-process vLLM (`LLM`, float32, eager), greedy, every step drafting K (VISPEC_VLLM_ADAPTIVE=0),
  one request at a time over held-out scene prompts (`--warmup-requests` untimed first).
- Timers (wall clock; the CPU backend has no asynchronous work) wrap the engine step and the model
  runner's phases: `execute_model` (with `_update_states`, `_prepare_inputs`, `_model_forward`: the
  target's forward, over 1 + K tokens a request when speculating), `sample_tokens` (with `_sample`,
  the rejection sampler and `propose_draft_token_ids`: the drafting, within which the draft
  model's `forward` and `compute_logits` are timed too). Reported per engine step.
- Each set-up runs in a child process of its own (a vLLM CPU engine pins its process's threads);
  set-ups take turns within each of `--repeats`.

Writes benchmarks/results/step_breakdown.json: per set-up, each phase's ms per step and the tokens
per step and tokens/s (median over repeats, with min and max), and tokens/s over no speculation
paired by repeat.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, image_limit, machine_description, scene_module, spread, write_json

# (class path, method, label): the phases timed, outermost first.
TIMED = (
    ("vllm.v1.engine.core.EngineCore", "step", "engine_step"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "execute_model", "execute_model"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "_update_states", "update_states"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "_prepare_inputs", "prepare_inputs"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "_model_forward", "target_forward"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "sample_tokens", "sample_tokens"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "_sample", "sample"),
    ("vllm.v1.sample.rejection_sampler.RejectionSampler", "forward", "rejection_sampler"),
    ("vllm.v1.worker.gpu_model_runner.GPUModelRunner", "propose_draft_token_ids", "drafting"),
    ("vispec_vllm.draft_model.ViSpecDraftModel", "forward", "draft_forward"),
    ("vllm.model_executor.models.llama_eagle.EagleLlamaForCausalLM", "forward", "draft_forward"),
    ("vispec_vllm.draft_model.ViSpecDraftModel", "compute_logits", "draft_lm_head"),
    ("vllm.model_executor.models.llama_eagle.EagleLlamaForCausalLM", "compute_logits", "draft_lm_head"),
)


def install_timers(totals: dict[str, float], counts: collections.Counter) -> None:
    import importlib

    for class_path, method, label in TIMED:
        module_name, class_name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        original = getattr(cls, method)

        def timed(*args, _original=original, _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - started
                counts[_label] += 1

        setattr(cls, method, timed)


def measure(args: argparse.Namespace, setup: str) -> dict:
    """One set-up in this process: phase ms per engine step over the timed requests."""
    from vllm import LLM, SamplingParams

    from vispec_vllm.demo.prompts import scene_prompts

    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    install_timers(totals, counts)
    draft = {"vispec": args.vispec, "eagle": args.eagle}.get(setup)
    spec = None if draft is None else {"model": str(draft), "num_speculative_tokens": args.k,
                                       **({"method": "eagle"} if setup == "eagle" else {})}
    held_out = scene_prompts(held_out=True, scenes=scene_module(args.image_tokens))
    prompts = [held_out(i) for i in range(args.warmup_requests + args.num_requests)]
    llm = LLM(model=str(args.target), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              distributed_executor_backend="uni", limit_mm_per_prompt={"image": image_limit(prompts)},
              speculative_config=spec)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for prompt in prompts[: args.warmup_requests]:
        llm.chat([prompt], sampling, use_tqdm=False)
    totals.clear()
    counts.clear()
    started, tokens = time.perf_counter(), 0
    for prompt in prompts[args.warmup_requests:]:
        tokens += len(llm.chat([prompt], sampling, use_tqdm=False)[0].outputs[0].token_ids)
    seconds = time.perf_counter() - started
    steps = counts["engine_step"]
    return {"tokens": tokens, "engine_steps": steps, "tokens_per_step": tokens / steps, "tok_s": tokens / seconds,
            "ms_per_step": {label: 1e3 * total / steps for label, total in totals.items()},
            "calls_per_step": {label: count / steps for label, count in counts.items()}}


def summarise(setup: str, measured: list[dict], none: list[dict] | None) -> dict:
    def with_spread(values: list[float]) -> dict:
        low, median, high = spread(values)
        return {"median": median, "min": low, "max": high}

    labels = sorted({label for run in measured for label in run["ms_per_step"]})
    row = {"setup": setup, "repeats": len(measured), "tok_s": with_spread([run["tok_s"] for run in measured]),
           "tokens_per_step": with_spread([run["tokens_per_step"] for run in measured]),
           "ms_per_step": {label: with_spread([run["ms_per_step"].get(label, 0.0) for run in measured])
                           for label in labels},
           "calls_per_step": measured[-1]["calls_per_step"]}
    if none is not None and setup != "none":
        row["tok_s_over_none"] = with_spread([run["tok_s"] / base["tok_s"]
                                              for run, base in zip(measured, none, strict=True)])
    return row


def main() -> None:
    from vispec_vllm.demo.models import DEFAULT_IMAGE_TOKENS, DEMO_PAIRS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS, choices=sorted(DEMO_PAIRS),
                        help="which shipped pair, and its held-out scenes")
    parser.add_argument("--target", type=Path)
    parser.add_argument("--vispec", type=Path, help="default: the pair's ViSpec draft")
    parser.add_argument("--eagle", help="default: the pair's EAGLE-style draft; '' leaves it out")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=6)
    parser.add_argument("--warmup-requests", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=448)
    parser.add_argument("--out", type=Path, default=RESULTS / "step_breakdown.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # measure this set-up here, print JSON
    args = parser.parse_args()
    target, drafts = DEMO_PAIRS[args.image_tokens]
    args.target = args.target or target
    args.vispec = args.vispec or drafts["vispec"]
    args.eagle = drafts["eagle"] if args.eagle is None else (Path(args.eagle) if args.eagle else None)
    if args.child:
        print("STEP_BREAKDOWN " + json.dumps(measure(args, args.child)), flush=True)
        return

    setups = ["none", "vispec", *(["eagle"] if args.eagle else [])]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VISPEC_VLLM_ADAPTIVE": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    command = [sys.executable, __file__, "--image-tokens", str(args.image_tokens), "--target", str(args.target),
               "--vispec", str(args.vispec), "--eagle", str(args.eagle or ""), "--k", str(args.k),
               "--num-requests", str(args.num_requests), "--warmup-requests", str(args.warmup_requests),
               "--max-tokens", str(args.max_tokens)]
    measured: dict[str, list[dict]] = {setup: [] for setup in setups}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        order = setups if repeat % 2 == 0 else setups[::-1]
        for setup in order:
            result = subprocess.run([*command, "--child", setup], env=env, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("STEP_BREAKDOWN ")]
            if result.returncode != 0 or not lines:
                sys.exit(f"{setup}: the measuring process failed:\n{result.stderr[-4000:]}")
            run = json.loads(lines[-1].split(" ", 1)[1])
            measured[setup].append(run)
            print(f"repeat {repeat + 1}/{args.repeats} {setup:7s}: {run['tok_s']:.1f} tok/s, "
                  f"{run['tokens_per_step']:.2f} tokens a step, {run['ms_per_step']['engine_step']:.2f} ms a step",
                  flush=True)
    report = {"machine": machine_description(), "target": Path(args.target).name,
              "drafts": {"vispec": Path(args.vispec).name, **({"eagle": Path(args.eagle).name} if args.eagle else {})},
              "k": args.k, "repeats": args.repeats, "num_requests": args.num_requests,
              "warmup_requests": args.warmup_requests, "max_tokens": args.max_tokens,
              "setups": [summarise(setup, runs, measured["none"]) for setup, runs in measured.items()],
              "duration_s": time.perf_counter() - started}
    write_json(report, args.out)
    for row in report["setups"]:
        phases = ", ".join(f"{label} {value['median']:.2f}" for label, value in row["ms_per_step"].items())
        print(f"{row['setup']}: {row['tok_s']['median']:.1f} tok/s; ms per step: {phases}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

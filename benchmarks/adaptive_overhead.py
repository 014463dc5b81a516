"""What the load-adaptive path costs per step, apart from the K it picks: the default demo pair
in-process (float32, eager, one request at a time, greedy, 600 output tokens ignoring EOS, on
held-out scenes), once with a fixed K=5 (VISPEC_VLLM_ADAPTIVE=0) and once load-adaptive with the
schedule's K held at 5 on every step (same drafts, same steps, same tokens), in separate processes
taking turns. A third run scripts K through stretches of 24 steps at 5, 3, 0, 4, 2, 5, 1, 5, 3, 4
and reports the steady step time per K by steps since the K last changed (is a probe's first
stretch slower than the K in force's steps?).

    python benchmarks/adaptive_overhead.py [--pairs 4] [--out benchmarks/results/adaptive_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from common import RESULTS, spread, write_json

SCRIPTED_KS = [5, 3, 0, 4, 2, 5, 1, 5, 3, 4]
STRETCH = 24
PROMPTS = 6
MAX_TOKENS = 600


def run_one(mode: str) -> dict:
    """In this process: generate and time; `mode` is fixed, held5 or scripted."""
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ["VISPEC_VLLM_ADAPTIVE"] = "0" if mode == "fixed" else "1"
    from vispec_vllm import speculation_schedule

    steps: list[speculation_schedule.ScheduledStep] = []
    scheduled = {"steps": 0}
    if mode != "fixed":
        pattern = [5] if mode == "held5" else SCRIPTED_KS

        def step_k(self, batch: int) -> int:
            k = pattern[(scheduled["steps"] // STRETCH) % len(pattern)]
            scheduled["steps"] += 1
            return k

        original = speculation_schedule.OnlineSchedule.step_scheduled

        def step_scheduled(self, step) -> None:
            steps.append(step)
            original(self, step)

        speculation_schedule.AdaptiveSchedule.step_k = step_k
        speculation_schedule.OnlineSchedule.step_scheduled = step_scheduled

    from vllm import LLM, SamplingParams

    from vispec_vllm.demo.models import DEMO_PAIRS
    from vispec_vllm.demo.prompts import with_images
    from vispec_vllm.demo.run import held_out_prompts
    from vispec_vllm.demo.target import RECIPES

    target, drafts = DEMO_PAIRS[576]
    llm = LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=64,
              distributed_executor_backend="uni", limit_mm_per_prompt={"image": 1}, seed=0,
              speculative_config={"model": str(drafts["vispec"]), "num_speculative_tokens": 5})
    examples = held_out_prompts(RECIPES[576], 2 * PROMPTS)
    prompts = [with_images(messages, [s.image for s in scenes]) for scenes, messages in examples if len(scenes) == 1]
    llm.chat([prompts[0]], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)  # warm-up
    steps.clear()
    scheduled["steps"] = 0
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    started = time.perf_counter()
    tokens = 0
    for prompt in prompts[:PROMPTS]:
        tokens += sum(len(o.outputs[0].token_ids) for o in llm.chat([prompt], params, use_tqdm=False))
    result = {"mode": mode, "wall_s": time.perf_counter() - started, "output_tokens": tokens}
    if mode == "scripted":
        # A steady step: decode-only, the same request as the steps on both sides.
        by_k_since = defaultdict(list)
        for i in range(1, len(steps) - 1):
            step, k = steps[i], steps[i].k
            if not step.decode_only or not steps[i - 1].request_ids == step.request_ids == steps[i + 1].request_ids:
                continue
            first = i
            while first > 0 and steps[first - 1].k == k:
                first -= 1
            since = i - first
            by_k_since[(k, "0-7" if since < 8 else "8+")].append(steps[i + 1].started - step.started)
        result["step_ms"] = {f"K={k} steps {since} after a change": round(1e3 * statistics.median(v), 2)
                             for (k, since), v in sorted(by_k_since.items())}
        result["steps_timed"] = {f"K={k} steps {since} after a change": len(v)
                                 for (k, since), v in sorted(by_k_since.items())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="turns of fixed and held5 (order alternates)")
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive_overhead.json")
    parser.add_argument("--one", choices=["fixed", "held5", "scripted"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return

    def in_a_process(mode: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", mode], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode}: {result['wall_s']:.2f} s for {result['output_tokens']} tokens", flush=True)
        return result

    runs = []
    for turn in range(args.pairs):
        order = ["fixed", "held5"] if turn % 2 == 0 else ["held5", "fixed"]
        pair = {mode: in_a_process(mode) for mode in order}
        runs.append({"fixed_s": pair["fixed"]["wall_s"], "held5_s": pair["held5"]["wall_s"],
                     "held5_over_fixed": pair["held5"]["wall_s"] / pair["fixed"]["wall_s"]})
    lowest, median, highest = spread([r["held5_over_fixed"] for r in runs])
    scripted = in_a_process("scripted")
    report = {"pair": "scene-llava-deep-grown + scene-llava-deep-grown-vispec",
              "method": __doc__.split("\n\n")[0].replace("\n", " "),
              "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "runs": runs,
              "held5_over_fixed": {"median": median, "min": lowest, "max": highest},
              "scripted_step_ms": scripted["step_ms"], "scripted_steps_timed": scripted["steps_timed"]}
    write_json(report, args.out)
    print(f"load-adaptive held at K=5 over fixed K=5: {median:.3f} ({lowest:.3f}-{highest:.3f}); wrote {args.out}")


if __name__ == "__main__":
    main()

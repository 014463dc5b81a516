"""The experiment ViSpec is about: how much more a draft that sees the image is accepted than
text-style drafts, at today's 36 image tokens per image and at LLaVA-1.5's 576.

    python benchmarks/acceptance_regime.py            # both regimes, seeds 0-2, K = 1..7 (resumable)

For each regime's shipped demo target it trains, per training seed and with the same budget
(`vispec_vllm.demo.build`): `vispec`, `eagle` (EAGLE-style on the same target-generated data),
`eagle-captions` (EAGLE-style on text, then on the scene generator's short captions, the method's
EAGLE baseline) and `vispec-no-adaptor` (ablation). Then it measures vLLM's mean acceptance length
(1 + accepted / drafts) of every draft at every K on held-out scenes, greedy, float32, in-process,
with load-adaptive speculation off. Training and each measurement are kept under --work, so an
interrupted run resumes. Writes benchmarks/results/acceptance_regime.json and a PNG with the
spread across seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine_description, measure_acceptance, pyplot, spread, write_report

EAGLE_LAYOUT = ("eagle", "eagle-captions")  # stage-1 checkpoints, served as plain EAGLE
REPORT_K = 5


def train(work: Path, image_tokens: int, seeds: list[int], kinds: list[str]) -> None:
    """Records and drafts in a child process: vLLM's CPU worker pins this process's threads once an
    engine exists, and data generation starts one."""
    subprocess.run([sys.executable, "-m", "vispec_vllm.demo.build", str(work), "--image-tokens", str(image_tokens),
                    "--seeds", *map(str, seeds), "--kinds", *kinds], check=True)


def summarise(runs: list[dict], k: int = REPORT_K) -> dict:
    """Per regime at K=`k`: accepted tokens per draft (mean acceptance length - 1) by draft, with the
    spread across seeds, and ViSpec's ratio to each baseline (median over seeds)."""
    summary: dict = {}
    for image_tokens in sorted({r["image_tokens"] for r in runs}):
        accepted = {kind: sorted(r["mean_acceptance_length"] - 1 for r in runs
                                 if r["image_tokens"] == image_tokens and r["draft"] == kind and r["k"] == k
                                 and r["prompts"] == "image")
                    for kind in dict.fromkeys(r["draft"] for r in runs)}
        accepted = {kind: values for kind, values in accepted.items() if values}
        row: dict = {"k": k, "accepted_per_draft": {}}
        for kind, values in accepted.items():
            lo, median, hi = spread(values)
            row["accepted_per_draft"][kind] = {"median": median, "min": lo, "max": hi, "seeds": values}
        if "vispec" in accepted:
            vispec = statistics.median(accepted["vispec"])
            for baseline in ("eagle", "eagle-captions", "vispec-no-adaptor"):  # the drafts of the experiment
                if baseline in accepted:
                    row[f"vispec_over_{baseline}"] = vispec / statistics.median(accepted[baseline])
                    row[f"every_vispec_seed_above_every_{baseline}_seed"] = (
                        min(accepted["vispec"]) > max(accepted[baseline]))
        summary[str(image_tokens)] = row
    return summary


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    regimes = sorted({r["image_tokens"] for r in report["runs"]})
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.6 * len(regimes), 4.2), squeeze=False)
    for ax, image_tokens in zip(axes[0], regimes, strict=True):
        for kind in dict.fromkeys(r["draft"] for r in report["runs"]):
            rows = [r for r in report["runs"] if r["image_tokens"] == image_tokens and r["draft"] == kind
                    and r["prompts"] == "image"]
            ks = sorted({r["k"] for r in rows})
            if not ks:
                continue
            by_k = [[r["mean_acceptance_length"] for r in rows if r["k"] == k] for k in ks]
            medians = [statistics.median(v) for v in by_k]
            line, = ax.plot(ks, medians, "-o", markersize=3, label=kind)
            ax.fill_between(ks, [min(v) for v in by_k], [max(v) for v in by_k], color=line.get_color(), alpha=0.2)
        ax.set_title(f"{image_tokens} image tokens per image", fontsize=10)
        ax.set_xlabel("num_speculative_tokens K")
        ax.set_ylabel("mean acceptance length (1 + accepted/drafts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="draft (median, band: min-max over seeds)", title_fontsize=7)
    fig.suptitle("Acceptance in vLLM on held-out scenes, same training budget per draft", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    # Set here, never at import: whatever this process starts inherits its environment.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # Acceptance at a given K: load-adaptive speculation would lower K for the batched requests.
    os.environ["VISPEC_VLLM_ADAPTIVE"] = "0"
    from vispec_vllm.demo.build import BUDGETS, DRAFT_KINDS, VISPEC_VARIANTS, draft_dir
    from vispec_vllm.demo.models import DEMO_PAIRS
    from vispec_vllm.demo.target import RECIPES
    from vispec_vllm.training.data import scene_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", type=int, nargs="+", default=[36, 576], choices=sorted(DEMO_PAIRS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=list(range(1, 8)))
    parser.add_argument("--drafts", nargs="+", default=list(DRAFT_KINDS), choices=DRAFT_KINDS)
    parser.add_argument("--variants", nargs="*", default=list(VISPEC_VARIANTS), choices=VISPEC_VARIANTS,
                        help="ViSpec training variants, trained and measured for the first seed only")
    parser.add_argument("--variant-ks", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--num-requests", type=int, default=8, help="held-out prompts per measurement")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vispec-vllm" / "acceptance-regime")
    parser.add_argument("--out", type=Path, default=RESULTS / "acceptance_regime.json")
    args = parser.parse_args()

    measured_path = args.work / "measurements.jsonl"  # one line per measurement: resumable
    args.work.mkdir(parents=True, exist_ok=True)
    done = {}
    if measured_path.exists():
        for line in measured_path.read_text().splitlines():
            run = json.loads(line)
            done[(run["image_tokens"], run["draft"], run["seed"], run["k"], run["num_requests"])] = run
    # (image tokens, draft, seed, K, requests) of every measurement: the drafts at every seed and K,
    # the variants at the first seed and --variant-ks.
    planned = [(n, kind, seed, k, args.num_requests) for n in args.regimes
               for seed, kinds, ks in [(seed, args.drafts, args.ks) for seed in args.seeds]
               + [(args.seeds[0], args.variants, args.variant_ks)]
               for kind in kinds for k in ks]
    started = time.monotonic()
    for image_tokens in args.regimes:
        work = args.work / f"regime-{image_tokens}"
        target, _ = DEMO_PAIRS[image_tokens]
        train(work, image_tokens, args.seeds, args.drafts)
        if args.variants:
            train(work, image_tokens, args.seeds[:1], args.variants)
        recipe = RECIPES[image_tokens]
        held_out = scene_prompts(held_out=True, scenes=recipe.scenes)
        prompts = {"image": [held_out(i) for i in range(args.num_requests)]}
        max_images = max(sum(part.get("type") == "image_pil" for part in p[0]["content"]) for p in prompts["image"])
        for _, kind, seed, k, _ in [key for key in planned if key[0] == image_tokens]:
            key = (image_tokens, kind, seed, k, args.num_requests)
            if key in done:
                continue
            method = "eagle" if kind in EAGLE_LAYOUT else None
            value = measure_acceptance(target, draft_dir(work, seed, kind), method, k, prompts,
                                       BUDGETS[image_tokens].max_tokens, max_images)["image"]
            done[key] = {"image_tokens": image_tokens, "draft": kind, "seed": seed, "k": k, "prompts": "image",
                         "mean_acceptance_length": value, "num_requests": args.num_requests}
            with measured_path.open("a") as f:
                f.write(json.dumps(done[key]) + "\n")
            print(f"{image_tokens:4d} tokens  {kind:18s} seed {seed}  K={k}: {value:.3f} "
                  f"({(time.monotonic() - started) / 60:.1f} min)", flush=True)
    runs = [done[key] for key in planned]
    report = {
        "machine": machine_description(),
        "target": DEMO_PAIRS[max(args.regimes)][0].name,
        "targets": {str(n): DEMO_PAIRS[n][0].name for n in args.regimes},
        "command": "python benchmarks/acceptance_regime.py " + " ".join(sys.argv[1:]),
        "budget": {str(n): vars(BUDGETS[n]) for n in args.regimes},
        "prompts": f"{args.num_requests} held-out prompts per measurement (vispec_vllm.training.data.scene_prompts): "
                   "describe one scene, or on the 576 target for some seeds compare two scenes; greedy, float32, "
                   "in-process vLLM, every step drafts K (load-adaptive speculation off)",
        "variants": {name: VISPEC_VARIANTS[name] for name in args.variants},
        "summary": summarise(runs),
        "runs": runs,
    }
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()

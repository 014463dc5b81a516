"""The experiment ViSpec is about: how much more a draft that sees the image is accepted than
text-style drafts with the same budget, on a target chosen by name (the headline regime first, by
default the 16-layer `scene-llava-deep` at 576 image tokens per image), then the 36-token target.

    python benchmarks/acceptance_regime.py --target-dir scene-llava-deep=DIR   # resumable

For each target it trains, per training seed, every draft kind and variant of
`vispec_vllm.demo.build` with the same budget (optimiser steps, schedule shape, peak lr): `vispec`,
`eagle` (EAGLE-style on the same target-generated data), `eagle-text` (text only, no image data),
`eagle-captions` (eagle-text with a short caption fine-tune at a lower lr), the ablations
`eagle-drop`, `vispec-keep`, `vispec-no-adaptor`, the diagnostic `eagle-text-drop` (eagle-text
served with every image row dropped), and the variants `vispec-bias` (the published fc/img_fc
biases), `vispec-reg` (stage 2 keeps stage 1's hidden-state regression), `vispec-drop` and
`vispec-drop-reg` (`vispec` and `vispec-reg` with eagle-drop's first half, which never saw an image
row). Then it measures in vLLM, for every draft at every K, on the same held-out prompts (at least
48 by default; layouts never trained on; two-image comparisons where the scenes have them), greedy,
float32, in-process, with load-adaptive speculation off: vLLM's mean acceptance length (1 + accepted
/ drafts) and the acceptance rate at each speculative position (vLLM's per-position counters).
Training and each measurement are kept under --work, so an interrupted run resumes. Writes
benchmarks/results/acceptance_regime.json and a PNG with the spread across seeds; `accepted_by_k`
tabulates accepted tokens per draft at every K."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, images_in, machine_description, measure_acceptance_by_position, pyplot, spread, write_report

REPORT_K = 5
DEFAULT_TARGETS = ("scene-llava-deep", "scene-llava")
# What ViSpec is compared with, in the summary.
BASELINES = ("eagle", "eagle-text", "eagle-captions", "eagle-drop", "vispec-keep", "vispec-no-adaptor",
             "eagle-text-drop", "vispec-bias", "vispec-reg", "vispec-drop", "vispec-drop-reg")
# The variants the experiment trains beside the draft kinds (vispec_vllm/demo/build.py VARIANTS).
MEASURED_VARIANTS = ("vispec-bias", "vispec-reg", "vispec-drop", "vispec-drop-reg")
MIN_HELD_OUT_PROMPTS = 48


def train(work: Path, recipe: str, target: Path, seeds: list[int], kinds: list[str]) -> None:
    """Records and drafts in a child process: vLLM's CPU worker pins this process's threads once an
    engine exists, and data generation starts one."""
    subprocess.run([sys.executable, "-m", "vispec_vllm.demo.build", str(work), "--recipe", recipe,
                    "--target", str(target), "--seeds", *map(str, seeds), "--kinds", *kinds], check=True)


def summarise(runs: list[dict], k: int = REPORT_K) -> dict:
    """Per target at K=`k`: accepted tokens per draft (mean acceptance length - 1) and the acceptance
    rate at each position, by draft with the spread across seeds, and ViSpec's ratio to each
    baseline (median over seeds)."""
    summary: dict = {}
    for target in dict.fromkeys(r["target"] for r in runs):
        at_k = [r for r in runs if r["target"] == target and r["k"] == k and r["prompts"] == "image"]
        by_draft = {kind: sorted((r for r in at_k if r["draft"] == kind), key=lambda r: r["seed"])
                    for kind in dict.fromkeys(r["draft"] for r in at_k)}
        row: dict = {"k": k, "accepted_per_draft": {}}
        accepted = {}
        for kind, kind_runs in by_draft.items():
            accepted[kind] = sorted(r["mean_acceptance_length"] - 1 for r in kind_runs)
            lo, median, hi = spread(accepted[kind])
            per_position = [statistics.median(rates)
                            for rates in zip(*(r["per_position"] for r in kind_runs), strict=True)]
            row["accepted_per_draft"][kind] = {"median": median, "min": lo, "max": hi, "seeds": accepted[kind],
                                               "per_position_median": per_position}
        if "vispec" in accepted:
            vispec = statistics.median(accepted["vispec"])
            for baseline in BASELINES:
                if baseline in accepted:
                    row[f"vispec_over_{baseline}"] = vispec / statistics.median(accepted[baseline])
                    row[f"every_vispec_seed_above_every_{baseline}_seed"] = (
                        min(accepted["vispec"]) > max(accepted[baseline]))
        summary[target] = row
    return summary


def accepted_by_k(runs: list[dict]) -> dict:
    """Per target, draft and K: accepted tokens per draft (mean acceptance length - 1), median over
    seeds with min and max, and how many seeds."""
    table: dict = {}
    for run in runs:
        per_k = table.setdefault(run["target"], {}).setdefault(run["draft"], {})
        per_k.setdefault(run["k"], []).append(run["mean_acceptance_length"] - 1)
    for per_draft in table.values():
        for draft, per_k in per_draft.items():
            cells = {}
            for k, values in sorted(per_k.items()):
                lo, median, hi = spread(values)
                cells[k] = {"median": median, "min": lo, "max": hi, "seeds": len(values)}
            per_draft[draft] = cells
    return table


def zero_acceptance_tails(runs: list[dict]) -> list[dict]:
    """Every run whose acceptance is exactly zero from some position on (each needs an explanation
    in the report): the first such position (1-based)."""
    tails = []
    for run in runs:
        rates = run["per_position"]
        first = len(rates)
        while first > 0 and rates[first - 1] == 0:
            first -= 1
        if first < len(rates):
            tails.append({**{key: run[key] for key in ("target", "draft", "seed", "k")},
                          "zero_from_position": first + 1})
    return tails


def plot(report: dict, path: Path) -> None:
    """Per target: mean acceptance length against K (top) and the acceptance rate at each position at
    K=REPORT_K (bottom), each draft's median over seeds with a min-max band."""
    plt = pyplot()
    targets = list(dict.fromkeys(r["target"] for r in report["runs"]))
    fig, axes = plt.subplots(2, len(targets), figsize=(5.6 * len(targets), 8.0), squeeze=False)
    for column, target in enumerate(targets):
        top, bottom = axes[0][column], axes[1][column]
        for kind in dict.fromkeys(r["draft"] for r in report["runs"]):
            rows = [r for r in report["runs"] if r["target"] == target and r["draft"] == kind
                    and r["prompts"] == "image"]
            ks = sorted({r["k"] for r in rows})
            if not ks:
                continue
            by_k = [[r["mean_acceptance_length"] for r in rows if r["k"] == k] for k in ks]
            line, = top.plot(ks, [statistics.median(v) for v in by_k], "-o", markersize=3, label=kind)
            top.fill_between(ks, [min(v) for v in by_k], [max(v) for v in by_k], color=line.get_color(), alpha=0.2)
            at_k = [r["per_position"] for r in rows if r["k"] == REPORT_K]
            if at_k:
                positions = range(1, len(at_k[0]) + 1)
                by_position = list(zip(*at_k, strict=True))
                bottom.plot(positions, [statistics.median(v) for v in by_position], "-o", markersize=3,
                            color=line.get_color(), label=kind)
                bottom.fill_between(positions, [min(v) for v in by_position], [max(v) for v in by_position],
                                    color=line.get_color(), alpha=0.2)
        image_tokens = report["targets"][target]["image_tokens"]
        top.set_title(f"{target} ({image_tokens} image tokens per image)", fontsize=10)
        top.set_xlabel("num_speculative_tokens K")
        top.set_ylabel("mean acceptance length (1 + accepted/drafts)")
        bottom.set_xlabel(f"speculative position (K = {REPORT_K})")
        bottom.set_ylabel("acceptance rate at the position")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=7, title="draft (median, band: min-max over seeds)", title_fontsize=7)
    fig.suptitle("Acceptance in vLLM on held-out prompts, same training budget per draft", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    # Set here, never at import: whatever this process starts inherits its environment.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # Acceptance at a given K: load-adaptive speculation would lower K for the batched requests.
    os.environ["VISPEC_VLLM_ADAPTIVE"] = "0"
    from vispec_vllm.demo.build import (
        DRAFT_KINDS,
        EAGLE_LAYOUT_KINDS,
        VARIANTS,
        budget_for,
        draft_dir,
        shipped_target,
    )
    from vispec_vllm.demo.prompts import scene_prompts
    from vispec_vllm.demo.target import RECIPES_BY_NAME

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), choices=sorted(RECIPES_BY_NAME),
                        help="target recipes by name, the headline regime first")
    parser.add_argument("--target-dir", action="append", default=[], metavar="NAME=DIR",
                        help="where target NAME is (default: where its recipe's target ships)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=list(range(1, 8)))
    parser.add_argument("--drafts", nargs="+", default=[*DRAFT_KINDS, *MEASURED_VARIANTS],
                        choices=[*DRAFT_KINDS, *VARIANTS])
    parser.add_argument("--num-requests", type=int, default=MIN_HELD_OUT_PROMPTS,
                        help=f"held-out prompts per measurement (the experiment uses at least {MIN_HELD_OUT_PROMPTS})")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vispec-vllm" / "acceptance-regime")
    parser.add_argument("--out", type=Path, default=RESULTS / "acceptance_regime.json")
    args = parser.parse_args()
    target_dirs = {name: shipped_target(RECIPES_BY_NAME[name]) for name in args.targets}
    for item in args.target_dir:
        name, _, directory = item.partition("=")
        if name not in target_dirs or not directory:
            parser.error(f"--target-dir {item!r}: expected NAME=DIR with NAME one of {args.targets}")
        target_dirs[name] = Path(directory)
    for name, directory in target_dirs.items():
        if not (directory / "config.json").is_file():
            parser.error(f"no target {name} at {directory}; pass --target-dir {name}=DIR")

    measured_path = args.work / "measurements.jsonl"  # one line per measurement: resumable
    args.work.mkdir(parents=True, exist_ok=True)
    done = {}
    if measured_path.exists():
        for line in measured_path.read_text().splitlines():
            run = json.loads(line)
            if "target" in run and "per_position" in run:  # older lines measured neither
                done[(run["target"], run["draft"], run["seed"], run["k"], run["num_requests"])] = run
    # (target, draft, seed, K, requests) of every measurement.
    # Seeds innermost: a measurement right after one of the same draft kind at the same K ran in
    # seconds instead of minutes here (one process, 2026-12-05), so each (kind, K) runs its seeds in a row.
    planned = [(name, kind, seed, k, args.num_requests)
               for name in args.targets for kind in args.drafts for k in args.ks for seed in args.seeds]
    started = time.monotonic()
    prompt_notes = {}
    for name in args.targets:
        recipe, target = RECIPES_BY_NAME[name], target_dirs[name]
        work = args.work / f"target-{name}"
        train(work, name, target, args.seeds, args.drafts)
        held_out = scene_prompts(held_out=True, scenes=recipe.scenes)
        prompts = {"image": [held_out(i) for i in range(args.num_requests)]}
        images_per_prompt = [images_in(prompt) for prompt in prompts["image"]]
        if hasattr(recipe.scenes, "compare_messages") and max(images_per_prompt) < 2:
            raise RuntimeError(f"{name}: no two-image prompt among the first {args.num_requests} held-out prompts")
        prompt_notes[name] = f"{images_per_prompt.count(2)} of {args.num_requests} with two images"
        for _, kind, seed, k, _ in [key for key in planned if key[0] == name]:
            key = (name, kind, seed, k, args.num_requests)
            if key in done:
                continue
            # The rest, the ablations eagle-drop and vispec-keep included, are ViSpec checkpoints.
            method = "eagle" if kind in EAGLE_LAYOUT_KINDS else None
            mean, per_position = measure_acceptance_by_position(
                target, draft_dir(work, seed, kind), method, k, prompts, budget_for(recipe).max_tokens)["image"]
            done[key] = {"target": name, "image_tokens": recipe.num_image_tokens, "draft": kind, "seed": seed, "k": k,
                         "prompts": "image", "mean_acceptance_length": mean, "per_position": per_position,
                         "num_requests": args.num_requests}
            with measured_path.open("a") as f:
                f.write(json.dumps(done[key]) + "\n")
            print(f"{name:18s} {kind:18s} seed {seed}  K={k}: {mean:.3f} "
                  f"({(time.monotonic() - started) / 60:.1f} min)", flush=True)
    runs = [done[key] for key in planned]
    report = {
        "machine": machine_description(),
        "target": args.targets[0],
        "targets": {name: {"dir": str(target_dirs[name]), "image_tokens": RECIPES_BY_NAME[name].num_image_tokens,
                           "prompts": prompt_notes[name]} for name in args.targets},
        "command": "python benchmarks/acceptance_regime.py " + " ".join(sys.argv[1:]),
        "budget": {name: vars(budget_for(RECIPES_BY_NAME[name])) for name in args.targets},
        "prompts": f"{args.num_requests} held-out prompts per measurement, the same for every draft "
                   "(vispec_vllm.demo.prompts.scene_prompts, held out: layouts never trained on): describe one "
                   "scene or, on rich scenes, compare two; greedy, float32, in-process vLLM, every step drafts K "
                   "(load-adaptive speculation off)",
        "variants": {name: VARIANTS[name] for name in args.drafts if name in VARIANTS},
        "summary": summarise(runs),
        "accepted_by_k": accepted_by_k(runs),
        # Runs whose acceptance is exactly zero past some position: the report must explain each.
        "zero_acceptance_tails": zero_acceptance_tails(runs),
        "runs": runs,
    }
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()

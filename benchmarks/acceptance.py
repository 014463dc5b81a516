"""Mean acceptance length in vLLM for several drafts of one target, K = 1..5, on held-out image
prompts and on text-only prompts. Writes benchmarks/results/acceptance.json and a PNG plot.

    python benchmarks/acceptance.py                      # the 36-token demo pair and its drafts
    python benchmarks/acceptance.py --image-tokens 576 --prompt-kinds image --ks 1 2 3 4 5 6 7 --num-requests 24 \
        --max-tokens 448                                 # the default pair (acceptance_<target>.json)
    python benchmarks/acceptance.py --target DIR --draft vispec=DIR --draft eagle=DIR [--ks 1 2 3]

Image prompts are held-out scenes (on rich scenes, in held-out layouts; some compare two images).
Text prompts mean nothing on the 576-token target: it was trained on image conversations only.

Mean acceptance length is vLLM's: 1 + accepted draft tokens / drafts (its Prometheus counters).
Engines run in-process in float32 (greedy decoding), with load-adaptive speculation off so that
every step drafts K tokens.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import RESULTS, TEXT_PROMPTS, machine_description, measure_acceptance, pyplot, write_report


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for draft in dict.fromkeys(r["draft"] for r in report["runs"]):
        for kind, style in (("image", "-o"), ("text", "--s")):
            rows = sorted((r["k"], r["mean_acceptance_length"]) for r in report["runs"]
                          if r["draft"] == draft and r["prompts"] == kind)
            if rows:
                ax.plot(*zip(*rows, strict=True), style, label=f"{draft}, {kind} prompts")
    ax.set_xlabel("num_speculative_tokens K")
    ax.set_ylabel("mean acceptance length (1 + accepted/drafts)")
    ax.set_title(f"{report['target']}: acceptance in vLLM", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    # Set here, never at import: whatever this process starts inherits its environment.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Acceptance at a given K: load-adaptive speculation would lower K for the batched requests.
    os.environ["VISPEC_VLLM_ADAPTIVE"] = "0"
    from vispec_vllm.demo.models import DEMO_PAIRS
    from vispec_vllm.demo.prompts import scene_prompts
    from vispec_vllm.demo.target import RECIPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-tokens", type=int, default=36, choices=sorted(DEMO_PAIRS),
                        help="which shipped pair (and its held-out scenes)")
    parser.add_argument("--target", type=Path, help="default: the pair's target")
    parser.add_argument("--draft", action="append", default=[],
                        help="NAME=DIR (NAME 'eagle' is served as plain EAGLE); default: the pair's drafts")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--prompt-kinds", nargs="+", choices=["image", "text"], default=["image", "text"])
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, help="default: acceptance.json (36) or acceptance_<target>.json")
    args = parser.parse_args()

    pair_target, pair_drafts = DEMO_PAIRS[args.image_tokens]
    target = args.target or pair_target
    recipe = RECIPES[args.image_tokens]
    out = args.out or RESULTS / ("acceptance.json" if args.image_tokens == 36 else f"acceptance_{recipe.name}.json")
    drafts = dict(d.split("=", 1) for d in args.draft) if args.draft else {k: str(v) for k, v in pair_drafts.items()}
    held_out = scene_prompts(held_out=True, scenes=recipe.scenes)
    prompts = {"image": [held_out(i) for i in range(args.num_requests)],
               "text": [[{"role": "user", "content": TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}]
                        for i in range(args.num_requests)]}
    prompts = {kind: prompts[kind] for kind in args.prompt_kinds}
    report = {"machine": machine_description(), "target": target.name, "image_tokens": args.image_tokens,
              "max_tokens": args.max_tokens, "drafts": {name: Path(draft).name for name, draft in drafts.items()},
              "runs": []}
    for name, draft in drafts.items():
        for k in args.ks:
            measured = measure_acceptance(target, Path(draft), "eagle" if name == "eagle" else None, k, prompts,
                                          args.max_tokens)
            for kind, value in measured.items():
                report["runs"].append({"draft": name, "k": k, "prompts": kind, "mean_acceptance_length": value,
                                       "num_requests": args.num_requests})
                print(f"{name:18s} K={k} {kind:5s} prompts: mean acceptance length {value:.3f}", flush=True)
    write_report(report, out, plot)


if __name__ == "__main__":
    main()

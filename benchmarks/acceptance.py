"""Mean acceptance length in vLLM for several drafts of one target, K = 1..5, on held-out image
prompts and on text-only prompts. Writes benchmarks/results/acceptance.json and a PNG plot.

    python benchmarks/acceptance.py                      # the shipped demo pair and its drafts
    python benchmarks/acceptance.py --target DIR --draft vispec=DIR --draft eagle=DIR [--ks 1 2 3]

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
    from vispec_vllm.demo.models import DEMO_DRAFTS, DEMO_TARGET
    from vispec_vllm.demo.prompts import scene_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=DEMO_TARGET)
    parser.add_argument("--draft", action="append", default=[],
                        help="NAME=DIR (NAME 'eagle' is served as plain EAGLE); default: the demo drafts")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "acceptance.json")
    args = parser.parse_args()

    drafts = dict(d.split("=", 1) for d in args.draft) if args.draft else {k: str(v) for k, v in DEMO_DRAFTS.items()}
    held_out = scene_prompts(held_out=True)
    prompts = {"image": [held_out(i) for i in range(args.num_requests)],
               "text": [[{"role": "user", "content": TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}]
                        for i in range(args.num_requests)]}
    report = {"machine": machine_description(), "target": args.target.name, "runs": []}
    for name, draft in drafts.items():
        for k in args.ks:
            measured = measure_acceptance(args.target, Path(draft), "eagle" if name == "eagle" else None, k, prompts,
                                          args.max_tokens)
            for kind, value in measured.items():
                report["runs"].append({"draft": name, "k": k, "prompts": kind, "mean_acceptance_length": value,
                                       "num_requests": args.num_requests})
                print(f"{name:18s} K={k} {kind:5s} prompts: mean acceptance length {value:.3f}", flush=True)
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()

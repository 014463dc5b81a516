"""The main job's speed-up at concurrency 1, for the plugin's code before and after a change.

    python benchmarks/demo_before_after.py                  # before = f7cf820, after = this checkout
    python benchmarks/demo_before_after.py --repeats 3 --before-commit REV

Runs `vispec-vllm demo` (the shipped demo pair, 8 held-out scenes one at a time, no speculation
and then ViSpec) for each version in turn (before, after, after, before, ...), each in a process
whose PYTHONPATH puts that version's tree first (the "before" tree is a git worktree, made if
missing). Each run reports its own ratio of ViSpec to no speculation, measured minutes apart from
the other version's, so the spread across repeats is part of the result. Writes
benchmarks/results/demo_before_after.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CHECKOUT, RESULTS, ensure_worktree, git, machine_description, spread_fields, write_json

BEFORE_COMMIT = "f7cf820"
_SPEED_UP = re.compile(r"Speed-up over no speculation on this machine: ([0-9.]+)x \(([0-9.]+) vs ([0-9.]+) output")
_ACCEPTANCE = re.compile(r"Mean acceptance length \(vLLM's 1 \+ accepted/drafts\): ([0-9.]+)")
_IDENTICAL = re.compile(r"Outputs identical with and without speculation: (True|False)")


def run_demo(tree: Path, scratch: Path) -> dict:
    """One `vispec-vllm demo` with `tree`'s code; its printed numbers (older versions print only).
    It runs in `scratch`, so that a version that writes benchmarks/results/demo.json writes it there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "vispec_vllm.cli", "demo"], cwd=scratch, env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"demo in {tree} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    speed_up = _SPEED_UP.search(out.stdout)
    return {"speedup": float(speed_up[1]), "tok_s_vispec": float(speed_up[2]), "tok_s_none": float(speed_up[3]),
            "mean_acceptance_length": float(_ACCEPTANCE.search(out.stdout)[1]),
            "outputs_identical": _IDENTICAL.search(out.stdout)[1] == "True"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-commit", default=BEFORE_COMMIT)
    parser.add_argument("--before-tree", type=Path, default=Path("/tmp/vispec-before"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_before_after.json")
    args = parser.parse_args()
    ensure_worktree(args.before_tree, args.before_commit)
    trees = {"before": args.before_tree.resolve(), "after": CHECKOUT}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    started = time.monotonic()
    for repeat in range(args.repeats):
        order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
        for version in order:
            with tempfile.TemporaryDirectory() as scratch:
                result = run_demo(trees[version], Path(scratch))
            runs[version].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {version:6s}: {result['speedup']:.2f}x "
                  f"({result['tok_s_vispec']:.1f} vs {result['tok_s_none']:.1f} tok/s), "
                  f"acceptance {result['mean_acceptance_length']:.2f}", flush=True)
    report = {
        "machine": machine_description(),
        "command": "python benchmarks/demo_before_after.py",
        "versions": {version: {"tree": str(tree), "commit": git(tree, "rev-parse", "HEAD")}
                     for version, tree in trees.items()},
        "repeats": args.repeats,
        "duration_s": time.monotonic() - started,
        "results": {version: {**spread_fields("speedup", [r["speedup"] for r in results]),
                              **spread_fields("tok_s_vispec", [r["tok_s_vispec"] for r in results]),
                              **spread_fields("tok_s_none", [r["tok_s_none"] for r in results]),
                              "mean_acceptance_length": [r["mean_acceptance_length"] for r in results],
                              "outputs_identical": all(r["outputs_identical"] for r in results),
                              "runs": results}
                    for version, results in runs.items()},
    }
    write_json(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

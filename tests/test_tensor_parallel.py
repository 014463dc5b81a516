"""A ViSpec draft with the target at tensor-parallel size 2 gives the same greedy outputs and the
same drafting counters as size 1 (vLLM CPU: one process per rank, one core each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def run(tiny_models: Path, tp: int) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "PYTHONPATH": str(TESTS),
           # vLLM CPU binds each rank's threads to cores; on a 2-core machine give one core per rank.
           "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    result = subprocess.run([sys.executable, str(TESTS / "tensor_parallel_run.py"), str(tiny_models / "tiny-llava"),
                             str(tiny_models / "tiny-llava-vispec"), str(tp)],
                            capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_tensor_parallel_2_matches_1(tiny_models):
    single, double = run(tiny_models, 1), run(tiny_models, 2)
    assert double["outputs"] == single["outputs"]
    assert (double["drafts"], double["accepted"]) == (single["drafts"], single["accepted"])
    assert double["drafts"] > 0

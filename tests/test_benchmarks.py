"""Smoke tests of the benchmark commands on tiny random models (bounded; one small setting each):
they run end to end and write well-formed JSON and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_serve_concurrency_benchmark_smoke(tiny_models, tmp_path):
    out = tmp_path / "serve_concurrency.json"
    run("serve_concurrency.py", "--target", str(tiny_models / "tiny-llava"),
        "--vispec", str(tiny_models / "tiny-llava-vispec"), "--eagle", "", "--runs", "none", "vispec",
        "--concurrency", "2", "--prompts-per-concurrency", "4", "--output-len", "32", "--repeats", "1",
        "--out", str(out))
    report = json.loads(out.read_text())
    assert report["target"] == "tiny-llava" and report["machine"]
    assert [(r["mode"], r["concurrency"]) for r in report["runs"]] == [("none", 2), ("vispec", 2)]
    for row in report["runs"]:
        assert row["output_tok_s"] > 0 and row["ttft_ms_p50"] > 0 and row["itl_ms_p99"] >= row["itl_ms_p50"]
        assert (row["mean_acceptance_length"] is None) == (row["mode"] == "none")
        assert (row["mean_draft_tokens"] is None) == (row["mode"] == "none")
        assert 0 < row["mean_running_requests"] <= 2 and row["engine_steps"] > 0
        # Every step samples at least one token per running request.
        assert row["engine_steps"] <= row["output_tokens"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_acceptance_report_smoke(tiny_models, tmp_path):
    out = tmp_path / "acceptance.json"
    run("acceptance.py", "--target", str(tiny_models / "tiny-llava"),
        "--draft", f"vispec={tiny_models / 'tiny-llava-vispec'}", "--ks", "2", "--num-requests", "2",
        "--max-tokens", "8", "--out", str(out))
    report = json.loads(out.read_text())
    assert {(r["draft"], r["k"], r["prompts"]) for r in report["runs"]} == {("vispec", 2, "image"),
                                                                          ("vispec", 2, "text")}
    assert all(1.0 <= r["mean_acceptance_length"] <= 3.0 and r["num_requests"] == 2 for r in report["runs"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Smoke tests of the benchmark commands on tiny random models (bounded; one small setting each):
they run end to end and write well-formed JSON and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def run(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.server
def test_serve_concurrency_benchmark_smoke(tiny_models, tmp_path):
    out = tmp_path / "serve_concurrency.json"
    run("serve_concurrency.py", "--smoke", "--target", str(tiny_models / "tiny-llava"),
        "--vispec", str(tiny_models / "tiny-llava-vispec"), "--eagle", "", "--runs", "none", "vispec",
        "--out", str(out))
    report = json.loads(out.read_text())
    assert report["target"] == "tiny-llava" and report["machine"] and report["repeats"] == 2
    assert [(r["mode"], r["concurrency"]) for r in report["runs"]] == [("none", 2), ("vispec", 2)]
    none, vispec = report["runs"]
    for row in report["runs"]:
        assert row["repeats"] == len(row["output_tok_s_repeats"]) == 2
        # The row's throughput is the median of its repeats, with their min and max.
        repeats = sorted(row["output_tok_s_repeats"])
        assert row["output_tok_s"] == pytest.approx(sum(repeats) / 2)
        assert (row["output_tok_s_min"], row["output_tok_s_max"]) == (repeats[0], repeats[1])
        assert row["output_tok_s_min"] > 0 and row["ttft_ms_p50"] > 0 and row["itl_ms_p99"] >= row["itl_ms_p50"]
        assert (row["mean_acceptance_length"] is None) == (row["mode"] == "none")
        assert (row["mean_draft_tokens"] is None) == (row["mode"] == "none")
        assert 0 < row["mean_running_requests"] <= 2 and row["engine_steps"] > 0
        # Every step samples at least one token per running request.
        assert row["engine_steps"] <= row["output_tokens"]
        # Each request brings its own image: repeats do not hit the prefix cache past the template.
        assert row["prefix_cache_hit_rate_max"] < 0.5
    # The ratio pairs each repeat with the run without speculation of the same repeat.
    ratios = [v / n for v, n in zip(vispec["output_tok_s_repeats"], none["output_tok_s_repeats"], strict=True)]
    assert vispec["ratio_to_none_repeats"] == pytest.approx(ratios)
    assert vispec["ratio_to_none"] == pytest.approx(sum(ratios) / 2)
    assert (vispec["ratio_to_none_min"], vispec["ratio_to_none_max"]) == pytest.approx((min(ratios), max(ratios)))
    assert none["ratio_to_none"] is None
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not out.with_suffix(".partial.json").exists()  # written after repeat 1, gone once complete


@pytest.mark.engine
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


@pytest.mark.engine
def test_step_breakdown_smoke(tiny_models, tmp_path):
    out = tmp_path / "step_breakdown.json"
    run("step_breakdown.py", "--target", str(tiny_models / "tiny-llava"), "--vispec",
        str(tiny_models / "tiny-llava-vispec"), "--eagle", "", "--k", "2", "--repeats", "1", "--num-requests", "2",
        "--warmup-requests", "1", "--max-tokens", "8", "--image-tokens", "36", "--out", str(out))
    report = json.loads(out.read_text())
    rows = {row["setup"]: row for row in report["setups"]}
    assert set(rows) == {"none", "vispec"} and report["k"] == 2
    none, vispec = rows["none"], rows["vispec"]
    # One token a step without speculation; every step drafts with it (K draft forwards a step).
    assert none["tokens_per_step"]["median"] == 1.0 and "drafting" not in none["ms_per_step"]
    assert vispec["tokens_per_step"]["median"] >= 1.0 and vispec["calls_per_step"]["draft_forward"] > 1
    for row in rows.values():
        phases = {label: value["median"] for label, value in row["ms_per_step"].items()}
        assert 0 < phases["target_forward"] < phases["execute_model"] < phases["engine_step"]
    assert vispec["ms_per_step"]["draft_forward"]["median"] < vispec["ms_per_step"]["drafting"]["median"]
    assert vispec["tok_s_over_none"]["median"] > 0


@pytest.mark.engine
def test_proposer_overhead_smoke(tiny_models, tmp_path):
    out = tmp_path / "proposer_overhead.json"
    run("proposer_overhead.py", "--smoke", "--target", str(tiny_models / "tiny-llava"),
        "--draft", str(tiny_models / "tiny-llava-vispec"), "--out", str(out))
    report = json.loads(out.read_text())
    # This checkout only, every plugin module loaded from it.
    assert list(report["versions"]) == ["after"] and report["comparison"] == []
    modules = report["versions"]["after"]["modules"]
    assert {"vispec_vllm.proposer", "vispec_vllm.draft_model", "vispec_vllm.patches"} <= set(modules)
    assert all(Path(path).resolve().is_relative_to(REPO) for path in modules.values())
    rows = {row["steps"]: row for row in report["rows"]}
    assert set(rows) == {"all", "prefill", "decode"} and {row["batch"] for row in rows.values()} == {2}
    every = rows["all"]
    assert every["num_steps"] == [4] and rows["prefill"]["num_steps"][0] + rows["decode"]["num_steps"][0] == 4
    # Host time: the proposer's call less the draft network's, which runs inside it.
    assert every["draft_network_ms_median"] > 0 and 0 < every["host_ms_median"] < every["propose_ms_median"]
    assert every["host_ms_median"] <= every["host_ms_p90"]
    assert 0 <= every["image_request_share"] <= 1


def test_proposer_overhead_refuses_modules_from_another_tree(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import proposer_overhead

    # This process loaded the plugin (conftest's tiny-model factory) from this checkout.
    assert "vispec_vllm" in proposer_overhead.plugin_modules(REPO)
    with pytest.raises(RuntimeError, match="outside"):
        proposer_overhead.plugin_modules(tmp_path)


def test_step_times_smoke(tmp_path):
    out = tmp_path / "step_times.json"
    run("step_times.py", "--targets", "tiny", "--device", "cpu", "--batch-sizes", "1", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["complete"] and report["dtype"] == "float32" and not report["cuda_graphs"]
    parts = {row["part"] for row in report["measurements"]}
    assert parts == {"target_step", "vispec_draft_step", "eagle_draft_step", "vispec_draft_step_eager", "adaptor"}
    target_steps = [r for r in report["measurements"] if r["part"] == "target_step"]
    assert {(r["batch"], r["query_tokens"]) for r in target_steps} == {(b, q) for b in (1, 2) for q in (1, 2, 4, 6)}
    assert all(0 < r["ms_p10"] <= r["ms_p50"] <= r["ms_p90"] for r in report["measurements"])


def test_cost_model_report_against_committed_measurements(tmp_path):
    # --check: the constants shipped in vispec_vllm/cost_model.py are the refit to the committed results.
    out = tmp_path / "cost_model.json"
    run("cost_model.py", "--check", "--out", str(out))
    report = json.loads(out.read_text())
    held_out = report["step_times"]["step_times_h200.json"]
    assert held_out["role"] == "held out" and held_out["summary"]["target_step"]["n"] > 0
    assert {r["setup"] for r in report["this_machine"]["rows"]} >= {"none", "vispec-fixed"}
    predictions = report["gpu_predictions"]
    assert {(r["hardware"], r["target"]) for r in predictions} == {
        (h, t) for h in ("H100 SXM", "H200") for t in ("llava-1.5-7b", "llava-1.6-7b", "llava-1.5-13b", "llava-1.6-13b",
                                                      "qwen2.5-vl-3b", "qwen2.5-vl-7b")}
    assert all(r["none_tok_s"] > 0 and r["vispec_tok_s"] > 0 for r in predictions)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.engine
def test_step_cost_forward_smoke(tmp_path):
    # Both drafts' vLLM modules at tiny widths, eager and compiled (Inductor), float32 and bf16.
    out = tmp_path / "step_cost.json"
    run("step_cost.py", "--smoke", "--part", "micro", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["machine"] and "--smoke" in report["command"] and report["num_speculative_tokens"] == 3
    sets = {row_set["name"]: row_set for row_set in report["micro"]["row_sets"]}
    assert set(sets) == {"prefill", "decode-chain-b1", "decode-chain-b2", "decode-first-pass-b1",
                         "decode-first-pass-b2"}
    rows = report["rows"]
    assert {(r["mode"], r["dtype"], r["rows"]) for r in rows} == {
        (m, d, s) for m in ("eager", "compiled") for d in ("float32", "bfloat16") for s in sets}
    for row in rows:
        row_set = sets[row["rows"]]
        assert row["part"] == "micro" and row["forwards"] == 2
        assert row["num_rows"] == row_set["requests"] * row_set["rows_per_request"]
        assert (row["compilation"] is None) == (row["mode"] == "eager")
        # The ViSpec attention carries the key-mask channel, padded to the CPU backend's next head size.
        assert (row["eagle_head_size"], row["vispec_head_size"]) == (32, 64)
        for draft in ("vispec", "eagle"):
            assert 0 < row[f"{draft}_ms_min"] <= row[f"{draft}_ms"] <= row[f"{draft}_ms_max"]
        assert row["ratio"] == pytest.approx(row["vispec_ms"] / row["eagle_ms"])
    assert sets["prefill"]["rows_per_request"] == 16 + 8 and sets["decode-first-pass-b2"]["rows_per_request"] == 4


@pytest.mark.server
def test_step_cost_itl_smoke(tmp_path):
    out = tmp_path / "step_cost.json"
    run("step_cost.py", "--smoke", "--part", "itl", "--modes", "eager", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["itl"]["target"] == "scene-llava" and report["itl"]["eagle"] == "scene-llava-eagle"
    (row,) = report["rows"]
    assert (row["part"], row["mode"], row["concurrency"], row["repeats"]) == ("itl", "eager", 2, 2)
    assert "--enforce-eager" in row["server_args"]
    for draft in ("vispec", "eagle"):
        repeats = sorted(row[f"{draft}_itl_ms_p50_repeats"])
        assert len(repeats) == 2 and repeats[0] > 0
        # The row's ITL is the median of its repeats, with their min and max.
        assert row[f"{draft}_itl_ms_p50"] == pytest.approx(sum(repeats) / 2)
        assert (row[f"{draft}_itl_ms_p50_min"], row[f"{draft}_itl_ms_p50_max"]) == (repeats[0], repeats[1])
    assert row["ratio"] == pytest.approx(row["vispec_itl_ms_p50"] / row["eagle_itl_ms_p50"])

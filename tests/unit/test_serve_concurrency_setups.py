"""The serve benchmark's set-ups (benchmarks/serve_concurrency.py): one fixed-K ViSpec server per K
asked for, the load-adaptive one up to its own K, the EAGLE-style one at its K; rows name their
set-up by K; the schedule check compares the adaptive set-up with the best fixed K at each
concurrency."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from serve_concurrency import schedule_against_fixed, setup_name, speculation_setups  # noqa: E402


def test_one_fixed_server_per_k():
    setups = speculation_setups(Path("/drafts/vispec"), "/drafts/eagle", 5, [1, 2, 3], 3)
    assert list(setups) == ["none", "vispec", "vispec-fixed-k1", "vispec-fixed-k2", "vispec-fixed-k3", "eagle"]
    for name, (mode, adaptive, k, serve_args, env) in setups.items():
        assert adaptive == (name == "vispec")
        if name == "none":
            assert serve_args == [] and k is None
            continue
        spec = json.loads(serve_args[1])
        assert spec["num_speculative_tokens"] == k
        assert spec["model"] == ("/drafts/eagle" if mode == "eagle" else "/drafts/vispec")
        assert env.get("VISPEC_VLLM_ADAPTIVE") == {"vispec": "1", "eagle": None}.get(name, "0")
    assert setups["vispec"].k == 5 and setups["vispec-fixed-k2"].k == 2 and setups["eagle"].k == 3


def row(mode: str, adaptive: bool, k: int | None, concurrency: int, tok_s: float, ratio_min: float | None = None):
    return {"mode": mode, "adaptive": adaptive, "num_speculative_tokens": k, "concurrency": concurrency,
            "output_tok_s": tok_s, "ratio_to_none_min": ratio_min}


def test_rows_name_their_set_up():
    assert setup_name(row("vispec", False, 4, 1, 1.0)) == "vispec-fixed-k4"
    assert setup_name(row("vispec", True, 5, 1, 1.0)) == "vispec"
    assert setup_name({"mode": "vispec", "adaptive": False}) == "vispec-fixed"  # older files
    assert setup_name(row("eagle", False, 3, 1, 1.0)) == "eagle"


def test_schedule_against_the_best_fixed_k():
    runs = [row("none", False, None, 1, 100.0), row("vispec", True, 5, 1, 190.0, 1.7),
            row("vispec", False, 1, 1, 150.0), row("vispec", False, 3, 1, 200.0), row("eagle", False, 3, 1, 300.0),
            row("none", False, None, 64, 400.0), row("vispec", True, 5, 64, 380.0, 0.9),
            row("vispec", False, 1, 64, 420.0), row("vispec", False, 3, 64, 410.0)]
    first, last = schedule_against_fixed(runs)
    assert (first["concurrency"], first["best_fixed"]) == (1, "vispec-fixed-k3")  # EAGLE is not a ViSpec K
    assert first["adaptive_to_best_fixed"] == pytest.approx(0.95)
    assert (last["best_fixed"], last["adaptive_to_none_min"]) == ("vispec-fixed-k1", 0.9)
    assert last["adaptive_to_best_fixed"] == pytest.approx(380 / 420)
    assert schedule_against_fixed([r for r in runs if not r["adaptive"]]) == []


def test_schedule_against_each_fixed_k_repeat_by_repeat():
    adaptive = row("vispec", True, 5, 2, 200.0, 1.2) | {"output_tok_s_repeats": [190.0, 260.0, 200.0]}
    fixed = row("vispec", False, 5, 2, 220.0) | {"output_tok_s_repeats": [200.0, 220.0, 250.0]}
    (check,) = schedule_against_fixed([adaptive, fixed])
    assert check["adaptive_to_best_fixed"] == pytest.approx(200 / 220)  # the ratio of medians
    paired = check["adaptive_to_fixed_paired"]["vispec-fixed-k5"]
    assert paired["ratio"] == pytest.approx(0.95)  # median of 0.95, 260/220 and 0.8
    assert (paired["ratio_min"], paired["ratio_max"]) == (pytest.approx(0.8), pytest.approx(260 / 220))


def test_low_concurrency_runs_get_at_least_the_minimum_requests():
    from serve_concurrency import num_prompts

    assert [num_prompts(2, c) for c in (1, 4, 8, 64)] == [8, 8, 16, 128]  # 2 x max(4, c), as before
    assert [num_prompts(2, c, min_prompts=24) for c in (1, 8, 16, 64)] == [24, 24, 32, 128]

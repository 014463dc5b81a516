"""The regime report's summary (benchmarks/acceptance_regime.py): per target, accepted tokens per
draft at K=5 with the spread across seeds and the median acceptance rate at each position, ViSpec's
ratio to each baseline, the every-seed check, and the runs whose acceptance is zero past a position."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from acceptance_regime import accepted_by_k, summarise, zero_acceptance_tails  # noqa: E402

DEEP = "scene-llava-deep"


def run(target: str, draft: str, seed: int, k: int, mean_acceptance_length: float,
        per_position: list[float] | None = None) -> dict:
    return {"target": target, "image_tokens": 576 if target == DEEP else 36, "draft": draft, "seed": seed, "k": k,
            "prompts": "image", "mean_acceptance_length": mean_acceptance_length,
            "per_position": per_position or [0.5] * k, "num_requests": 48}


def test_summary_ratios_and_seed_spread():
    runs = [run(DEEP, "vispec", s, 5, v, [0.9, 0.6, 0.4, 0.2, p]) for s, v, p in zip(range(3), (3.0, 3.4, 3.2),
                                                                                     (0.1, 0.3, 0.2), strict=True)]
    runs += [run(DEEP, "eagle", s, 5, v) for s, v in enumerate((2.0, 2.5, 2.2))]
    runs += [run(DEEP, "eagle-captions", s, 5, v) for s, v in enumerate((1.4, 1.5, 1.6))]
    runs += [run(DEEP, "vispec", 0, 3, 9.0), run("scene-llava", "vispec", 0, 5, 4.0)]  # other K / target: apart
    row = summarise(runs)[DEEP]
    vispec = row["accepted_per_draft"]["vispec"]
    assert {key: vispec[key] for key in ("median", "min", "max", "seeds")} == {
        "median": pytest.approx(2.2), "min": pytest.approx(2.0), "max": pytest.approx(2.4),
        "seeds": pytest.approx([2.0, 2.2, 2.4])}
    assert vispec["per_position_median"] == pytest.approx([0.9, 0.6, 0.4, 0.2, 0.2])
    assert row["vispec_over_eagle"] == pytest.approx(2.2 / 1.2)
    assert row["vispec_over_eagle-captions"] == pytest.approx(2.2 / 0.5)
    assert row["every_vispec_seed_above_every_eagle_seed"] is True
    runs.append(run(DEEP, "eagle", 3, 5, 3.1))  # one eagle seed above the worst vispec seed
    assert summarise(runs)[DEEP]["every_vispec_seed_above_every_eagle_seed"] is False
    assert "vispec_over_vispec-no-adaptor" not in row
    assert summarise(runs)["scene-llava"]["accepted_per_draft"]["vispec"]["median"] == pytest.approx(3.0)


def test_zero_acceptance_tails_name_the_first_zero_position():
    runs = [run(DEEP, "eagle-text", 0, 4, 1.1, [0.1, 0.0, 0.0, 0.0]),
            run(DEEP, "vispec", 0, 4, 2.0, [0.6, 0.0, 0.3, 0.1]),  # a zero inside, not a tail
            run(DEEP, "eagle", 1, 3, 1.0, [0.0, 0.0, 0.0])]
    assert zero_acceptance_tails(runs) == [
        {"target": DEEP, "draft": "eagle-text", "seed": 0, "k": 4, "zero_from_position": 2},
        {"target": DEEP, "draft": "eagle", "seed": 1, "k": 3, "zero_from_position": 1}]


def test_accepted_tokens_by_k_with_the_seed_spread():
    runs = [run(DEEP, "vispec", s, k, 1 + k * v) for s, v in enumerate((0.5, 0.7, 0.6)) for k in (1, 3)]
    runs += [run(DEEP, "eagle", 0, 3, 2.0), run("scene-llava", "vispec", 0, 3, 4.0)]
    table = accepted_by_k(runs)
    assert table[DEEP]["vispec"][1] == {"median": pytest.approx(0.6), "min": 0.5, "max": 0.7, "seeds": 3}
    assert table[DEEP]["vispec"][3] == {"median": pytest.approx(1.8), "min": 1.5, "max": pytest.approx(2.1),
                                        "seeds": 3}
    assert table[DEEP]["eagle"] == {3: {"median": 1.0, "min": 1.0, "max": 1.0, "seeds": 1}}
    assert table["scene-llava"]["vispec"][3]["median"] == 3.0

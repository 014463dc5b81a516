"""The regime report's summary (benchmarks/acceptance_regime.py): accepted tokens per draft at K=5
by draft with the spread across seeds, ViSpec's ratio to each baseline, and the every-seed check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from acceptance_regime import summarise  # noqa: E402


def run(image_tokens: int, draft: str, seed: int, k: int, mean_acceptance_length: float) -> dict:
    return {"image_tokens": image_tokens, "draft": draft, "seed": seed, "k": k, "prompts": "image",
            "mean_acceptance_length": mean_acceptance_length, "num_requests": 8}


def test_summary_ratios_and_seed_spread():
    runs = [run(576, "vispec", s, 5, v) for s, v in enumerate((3.0, 3.4, 3.2))]
    runs += [run(576, "eagle", s, 5, v) for s, v in enumerate((2.0, 2.5, 2.2))]
    runs += [run(576, "eagle-captions", s, 5, v) for s, v in enumerate((1.4, 1.5, 1.6))]
    runs += [run(576, "vispec", 0, 3, 9.0), run(36, "vispec", 0, 5, 4.0)]  # other K / regime: not mixed in
    row = summarise(runs)["576"]
    assert row["accepted_per_draft"]["vispec"] == {"median": pytest.approx(2.2), "min": pytest.approx(2.0),
                                                   "max": pytest.approx(2.4), "seeds": pytest.approx([2.0, 2.2, 2.4])}
    assert row["vispec_over_eagle"] == pytest.approx(2.2 / 1.2)
    assert row["vispec_over_eagle-captions"] == pytest.approx(2.2 / 0.5)
    assert row["every_vispec_seed_above_every_eagle_seed"] is True
    runs.append(run(576, "eagle", 3, 5, 3.1))  # one eagle seed above the worst vispec seed
    assert summarise(runs)["576"]["every_vispec_seed_above_every_eagle_seed"] is False
    assert "vispec_over_vispec-no-adaptor" not in row

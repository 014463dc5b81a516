"""The step-cost report (benchmarks/step_cost.py): a run of one part replaces that part's rows and
keeps the other part's, with the command that measured each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from step_cost import keep_other_part  # noqa: E402


def report(command: str, parts: dict[str, int], smoke: bool = False, per_part_command: bool = True) -> dict:
    """A report with `parts[name]` rows of each part, each row tagged with `command`."""
    result = {"machine": "m", "command": command, "num_speculative_tokens": 3, "smoke": smoke, "rows": []}
    for part, count in parts.items():
        result[part] = {"setting": part} | ({"command": command} if per_part_command else {})
        result["rows"] += [{"part": part, "index": i, "by": command} for i in range(count)]
    return result


def test_a_micro_run_keeps_the_previous_itl_rows(tmp_path):
    previous = tmp_path / "step_cost.json"
    previous.write_text(json.dumps(report("both-parts", {"micro": 2, "itl": 3}, per_part_command=False)))
    merged = keep_other_part(report("micro-only", {"micro": 4}), previous, "micro")
    assert [(row["part"], row["by"]) for row in merged["rows"]] == [("micro", "micro-only")] * 4 + [
        ("itl", "both-parts")] * 3
    # A report written before each part kept its own command gets the top-level one.
    assert merged["micro"]["command"] == "micro-only" and merged["itl"]["command"] == "both-parts"
    assert merged["itl"]["setting"] == "itl" and merged["command"] == "micro-only ; both-parts"


def test_an_itl_run_keeps_the_previous_micro_rows_first(tmp_path):
    previous = tmp_path / "step_cost.json"
    previous.write_text(json.dumps(report("micro-only", {"micro": 2, "itl": 1})))
    merged = keep_other_part(report("itl-only", {"itl": 2}), previous, "itl")
    assert [(row["part"], row["by"]) for row in merged["rows"]] == [("micro", "micro-only")] * 2 + [
        ("itl", "itl-only")] * 2
    assert merged["command"] == "micro-only ; itl-only"


def test_nothing_is_kept_from_a_missing_or_other_kind_of_report(tmp_path):
    fresh = report("micro-only", {"micro": 1})
    assert keep_other_part(fresh, tmp_path / "missing.json", "micro") == fresh
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps(report("smoke", {"micro": 1, "itl": 1}, smoke=True)))
    assert keep_other_part(fresh, smoke, "micro") == fresh

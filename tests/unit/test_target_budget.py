"""A demo target trained to a step budget (vispec_vllm/demo/target.py, build.py): the learning-rate
schedule of the first cycle does not change when a restart is added, the restart warms up to its own
peak and decays to the first cycle's floor; a target whose recipe gained steps counts as not trained,
and training it on forgets the records and drafts made from it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vispec_vllm.demo.build import DONE_MARKER, _trained_budget, forget_derived, target_trained
from vispec_vllm.demo.target import DEEP, LR_WARMUP_FRACTION, PEAK_LR, SMALL, _learning_rate

WITHOUT_RESTART = replace(DEEP, restart=None)


def test_a_restart_leaves_the_first_cycle_as_it_was():
    first_cycle = sum(DEEP.steps)
    assert DEEP.restart is not None and DEEP.total_steps == first_cycle + DEEP.restart[0]
    for step in (0, 100, DEEP.steps[0], first_cycle // 2, first_cycle - 1):
        assert DEEP.learning_rate(step) == WITHOUT_RESTART.learning_rate(step) == _learning_rate(step / first_cycle)


def test_the_restart_warms_up_to_its_peak_and_decays_to_the_floor():
    first_cycle = sum(DEEP.steps)
    restart_steps, restart_peak = DEEP.restart
    warmed_up = first_cycle + round(LR_WARMUP_FRACTION * restart_steps)
    schedule = [DEEP.learning_rate(step) for step in range(first_cycle, DEEP.total_steps + 1)]
    assert schedule[0] < 0.1 * restart_peak  # it starts low again, not at the peak
    assert max(schedule) == pytest.approx(restart_peak)
    assert DEEP.learning_rate(warmed_up) == pytest.approx(restart_peak)
    rising, falling = schedule[: warmed_up - first_cycle + 1], schedule[warmed_up - first_cycle:]
    assert rising == sorted(rising) and falling == sorted(falling, reverse=True)
    floor = 0.05 * PEAK_LR
    assert schedule[-1] == pytest.approx(floor)
    assert DEEP.learning_rate(first_cycle - 1) == pytest.approx(floor, rel=1e-3)


def test_a_time_budget_has_no_step_total():
    with pytest.raises(ValueError, match="time budget"):
        SMALL.total_steps  # noqa: B018


def test_a_target_given_more_steps_trains_on_and_forgets_what_was_made_from_it(tmp_path):
    target = tmp_path / DEEP.name
    target.mkdir()
    assert not target_trained(target, DEEP)
    (target / DONE_MARKER).write_text(_trained_budget(WITHOUT_RESTART))  # finished before the restart
    assert target_trained(target, WITHOUT_RESTART) and not target_trained(target, DEEP)
    (target / DONE_MARKER).write_text(_trained_budget(DEEP))
    assert target_trained(target, DEEP)
    (target / DONE_MARKER).write_text("")  # written before markers held the budget
    assert not target_trained(target, DEEP) and target_trained(target, SMALL)

    for derived in ("records-generated", "records-text", "seed-0/vispec", "seed-1"):
        (tmp_path / derived).mkdir(parents=True)
    forget_derived(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEEP.name]

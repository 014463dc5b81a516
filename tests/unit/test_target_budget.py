"""A demo target trained to a step budget (vispec_vllm/demo/target.py, build.py): the learning-rate
schedule of the first cycle does not change when a restart is added, the restart warms up to its own
peak and decays to the first cycle's floor; a target whose recipe gained steps counts as not trained,
and training it on forgets the records and drafts made from it; a target grown from another's
starts from its weights and its training scenes come after the base's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vispec_vllm.demo.build import DONE_MARKER, _trained_budget, forget_derived, target_trained
from vispec_vllm.demo.target import DEEP, DEEP_GROWN, LR_WARMUP_FRACTION, PEAK_LR, SMALL, _learning_rate

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


def test_a_grown_target_draws_training_scenes_after_its_base():
    vision_steps, conversation_steps = DEEP.steps
    base_examples = vision_steps * DEEP.vision_batch_size + (conversation_steps + DEEP.restart[0]) * DEEP.batch_size
    assert DEEP.training_examples == base_examples
    assert DEEP_GROWN.training_examples == base_examples + 3000 * DEEP_GROWN.batch_size
    with pytest.raises(ValueError, match="time budget"):
        replace(DEEP_GROWN, grown_from=SMALL.name).training_examples  # noqa: B018


def test_a_grown_target_warms_up_to_its_own_peak_and_decays_to_the_floor():
    schedule = [DEEP_GROWN.learning_rate(step) for step in range(DEEP_GROWN.total_steps + 1)]
    assert schedule[0] < 0.1 * DEEP_GROWN.peak_lr
    assert max(schedule) == pytest.approx(DEEP_GROWN.peak_lr)
    warmed_up = round(LR_WARMUP_FRACTION * DEEP_GROWN.total_steps)
    assert DEEP_GROWN.learning_rate(warmed_up) == pytest.approx(DEEP_GROWN.peak_lr)
    assert schedule[-1] == pytest.approx(0.05 * PEAK_LR)


def test_a_grown_target_trains_on_from_its_base_and_resumes(tmp_path, monkeypatch):
    """Two steps grown from the shipped 36-token target: they start from its weights, draw the
    training scenes after its own, and a run given more steps resumes the saved state."""
    from safetensors.torch import load_file

    from vispec_vllm.demo import target as target_module
    from vispec_vllm.demo.models import DEMO_TARGET

    monkeypatch.setattr(target_module, "CHECKPOINT_EVERY_S", 1e9)  # only the final save
    base_examples = 1000
    monkeypatch.setitem(target_module.RECIPES_BY_NAME, "base", replace(SMALL, steps=(0, base_examples // 8)))
    grown = replace(SMALL, name="grown", steps=(0, 1), grown_from="base", bf16_autocast=True)
    base_weights = load_file(DEMO_TARGET / "model.safetensors")

    out = target_module.train_demo_target(tmp_path / "grown", recipe=grown, base_dir=DEMO_TARGET)
    state = torch.load(out / target_module.STATE_FILE, weights_only=True)
    assert state["step"] == 1 and state["seen"] == base_examples + grown.batch_size
    grown_weights = load_file(out / "model.safetensors")
    assert grown_weights.keys() == base_weights.keys()
    moved = [name for name, weight in grown_weights.items() if not torch.equal(weight.half(), base_weights[name])]
    assert moved and all((grown_weights[name] - base_weights[name].float()).abs().max() < 0.05 for name in moved)

    target_module.train_demo_target(out, recipe=replace(grown, steps=(0, 2)), base_dir=DEMO_TARGET)
    state = torch.load(out / target_module.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and state["seen"] == base_examples + 2 * grown.batch_size

    # Run again with its budget spent: nothing trains, and the recorded training time stays.
    target_module.train_demo_target(out, recipe=replace(grown, steps=(0, 2)), base_dir=DEMO_TARGET)
    again = torch.load(out / target_module.STATE_FILE, weights_only=True)
    assert again["step"] == 2 and again["elapsed"] == state["elapsed"]
    assert all(torch.equal(again["model"][name], weight) for name, weight in state["model"].items())


def test_a_grown_target_names_a_missing_base(tmp_path):
    from vispec_vllm.demo.target import train_demo_target

    grown = replace(SMALL, name="grown", steps=(0, 1), grown_from=SMALL.name)
    with pytest.raises(FileNotFoundError, match="base target `scene-llava` is not built"):
        train_demo_target(tmp_path / "grown", recipe=grown, base_dir=tmp_path / "nothing")

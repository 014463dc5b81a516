"""The drafts the regime experiment compares (vispec_vllm/demo/build.py) share one budget: the same
number of optimiser steps, the same schedule shape and peak lr in every half (eagle-captions' caption
fine-tune aside: at most 10% of the budget, at a lower lr); each ablation differs from its draft in
its own flag only; a run finished under another config is refused, and so is a finished keep draft
whose config.json does not say it keeps image rows; training imports no demo code."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from vispec_vllm.checkpoint_format import KEEP_IMAGE_ROWS_KEY
from vispec_vllm.demo.build import (
    DONE_MARKER,
    DRAFT_KINDS,
    SHIPPED_DRAFTS,
    VARIANTS,
    DraftBudget,
    budget_for,
    draft_plan,
    records_needed,
    runs_of,
    shipped_budget,
    train_once,
)
from vispec_vllm.demo.target import RECIPES

BUDGET = DraftBudget(num_samples=24, epochs=5)


def chain(plan: dict, name: str) -> list:
    """The runs of a draft, first half first."""
    return [plan[run] for run in runs_of(plan, name)]


def config_changes(a, b) -> dict:
    return {k: (v, asdict(b)[k]) for k, v in asdict(a).items() if asdict(b)[k] != v}


def test_every_draft_takes_the_same_steps_on_the_same_schedule():
    plan = draft_plan(BUDGET, seed=1)
    for name in (*DRAFT_KINDS, *VARIANTS):
        runs = chain(plan, name)
        assert sum(run.config.steps for run in runs) == 2 * BUDGET.epochs * BUDGET.num_samples, name
        assert {run.config.epochs for run in runs} == {BUDGET.epochs}, name
        assert {run.config.seed for run in runs} == {1}, name
        if name != "eagle-captions":
            assert [run.config.steps for run in runs] == [BUDGET.half_steps] * 2, name
            assert {run.config.lr for run in runs} == {BUDGET.lr}, name
    # ViSpec's stage 2 runs at the peak lr of the competitors' second half.
    assert plan["vispec"].config.lr == plan["eagle"].config.lr == plan["eagle-text"].config.lr
    captions = chain(plan, "eagle-captions")
    assert [run.records for run in captions] == ["text", "text", "captions"]
    assert captions[-1].config.steps <= 0.1 * 2 * BUDGET.half_steps
    assert captions[-1].config.lr < BUDGET.lr
    assert all(run.records == "text" for run in chain(plan, "eagle-text"))


def test_ablations_differ_from_their_draft_in_their_flag_only():
    plan = draft_plan(BUDGET, seed=0)
    assert config_changes(plan["vispec"].config, plan["vispec-no-adaptor"].config) == {"zero_adaptor": (False, True)}
    assert config_changes(plan["vispec"].config, plan["vispec-keep"].config) == {"keep_image_rows": (False, True)}
    assert plan["vispec-no-adaptor"].start == plan["vispec-keep"].start == plan["vispec"].start
    for eagle_run, drop_run in zip(chain(plan, "eagle"), chain(plan, "eagle-drop"), strict=True):
        assert eagle_run.records == drop_run.records == "generated"
        assert config_changes(eagle_run.config, drop_run.config) == {"drop_image_rows": (False, True)}
    vispec_bias = chain(plan, "vispec-bias")
    for vispec_run, bias_run in zip(chain(plan, "vispec"), vispec_bias, strict=True):
        assert config_changes(vispec_run.config, bias_run.config) == {"fc_bias": (False, True)}
    # The -drop variants: vispec's stage 2 after eagle-drop's first half (the run itself, not a copy).
    assert plan["vispec-drop"].config == plan["vispec"].config
    assert plan["vispec-drop"].start == plan["vispec-drop-reg"].start == plan["eagle-drop"].start
    assert config_changes(plan["vispec-drop"].config, plan["vispec-drop-reg"].config) == {
        "hidden_regression": (False, True)}


def test_records_needed_follow_each_draft_back_to_its_first_half():
    assert records_needed(BUDGET, ("vispec-drop-reg", "eagle")) == ("generated",)
    assert records_needed(BUDGET, ("eagle-captions",)) == ("captions", "text")
    assert records_needed(BUDGET, ("eagle-text-drop", "vispec")) == ("generated", "text")


@pytest.mark.parametrize("recipe", list(RECIPES.values()), ids=lambda recipe: recipe.name)
def test_the_shipped_drafts_share_one_budget(recipe):
    """The shipped ViSpec and EAGLE-style drafts: the same records and steps, at the regime
    experiment's lr and answer length; the ViSpec one trains as ViSpec (stage 2), the other as EAGLE."""
    budget = shipped_budget(recipe)
    assert (budget.lr, budget.max_tokens) == (budget_for(recipe).lr, budget_for(recipe).max_tokens)
    plan = draft_plan(budget, seed=0)
    runs = {name: chain(plan, kind) for name, kind in SHIPPED_DRAFTS.items()}
    for name, draft_runs in runs.items():
        assert [run.config.steps for run in draft_runs] == [budget.half_steps] * 2, name
        assert {run.records for run in draft_runs} == {"generated"}, name
    assert runs["vispec"][-1].config.stage == 2 and runs["eagle"][-1].config.stage == 1
    # build-demo trains them side by side, so they must share no run.
    assert not set(runs_of(plan, SHIPPED_DRAFTS["vispec"])) & set(runs_of(plan, SHIPPED_DRAFTS["eagle"]))
    assert runs_of(plan, "vispec") == ["stage1-generated", "vispec"]


def test_a_run_finished_under_another_config_is_refused(tmp_path):
    plan = draft_plan(BUDGET, seed=0)
    out = tmp_path / "vispec"
    out.mkdir()
    (out / "training_config.json").write_text(json.dumps(asdict(plan["vispec-keep"].config)))
    (out / "config.json").write_text(json.dumps({KEEP_IMAGE_ROWS_KEY: True}))
    (out / DONE_MARKER).write_text("")
    assert train_once(tmp_path, tmp_path, out, plan["vispec-keep"].config) == out  # same config: reused
    with pytest.raises(RuntimeError, match="keep_image_rows"):
        train_once(tmp_path, tmp_path, out, plan["vispec"].config)
    # A keep draft finished before training wrote the key would be served dropping its image rows.
    (out / "config.json").write_text(json.dumps({}))
    with pytest.raises(RuntimeError, match=KEEP_IMAGE_ROWS_KEY):
        train_once(tmp_path, tmp_path, out, plan["vispec-keep"].config)


def test_training_imports_no_demo_code():
    code = ("import sys, vispec_vllm.training.train, vispec_vllm.training.data; "
            "print(sorted(m for m in sys.modules if m.startswith(('vispec_vllm.demo', 'vllm'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_shipped_drafts_train_side_by_side_only_when_they_share_no_run(monkeypatch, tmp_path):
    """build-demo starts one training process per shipped draft; drafts that share a run (vispec and
    eagle share stage1-generated) would train it twice at once, so they are left to train in turn."""
    import vispec_vllm.demo.build as build

    started = []

    class FinishedProcess:
        def __init__(self, command):
            started.append(command)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr("subprocess.Popen", FinishedProcess)
    recipe = RECIPES[576]
    build.train_drafts_side_by_side(recipe, tmp_path / "target", tmp_path, 0, tuple(SHIPPED_DRAFTS.values()))
    assert [command[command.index("--kinds") + 1] for command in started] == list(SHIPPED_DRAFTS.values())
    assert all("--shipped-budget" in command for command in started)
    started.clear()
    build.train_drafts_side_by_side(recipe, tmp_path / "target", tmp_path, 0, ("vispec", "eagle"))
    assert started == []
    monkeypatch.setattr(FinishedProcess, "wait", lambda self: 1)
    with pytest.raises(RuntimeError, match="vispec-drop-reg, eagle draft failed"):
        build.train_drafts_side_by_side(recipe, tmp_path / "target", tmp_path, 0, tuple(SHIPPED_DRAFTS.values()))

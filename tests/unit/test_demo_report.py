"""The main job's report (benchmarks/results/demo.json, written by `vispec-vllm demo`) and the
measurements it is built from; no engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vispec_vllm.demo.run import draft_forward_ms, held_out_prompts, target_step_ms, warmup_prompts
from vispec_vllm.proposer_state import DraftTiming

DEMO_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "demo.json"


def test_the_drafting_time_the_proposer_logs_is_what_the_demo_reads():
    timing = DraftTiming()
    timing.add(0.030, 5)
    timing.add(0.010, 3)
    log = f"INFO ... ViSpec proposer state: 1 requests ...; {DraftTiming().summary()}\nother\n" \
          f"INFO ... ViSpec proposer state: 1 requests ...; {timing.summary()}\n"
    assert draft_forward_ms(log) == pytest.approx(5.0)  # 40 ms over 8 forwards, the last line
    assert draft_forward_ms("no timing logged") is None


def test_target_step_is_the_mean_inter_token_latency():
    metrics = ('vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 0.5\n'
               'vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 100.0\n')
    assert target_step_ms(metrics) == pytest.approx(5.0)
    assert target_step_ms("") is None


@pytest.mark.parametrize("name", ["demo.json", "demo_compiled.json"])
def test_demo_json_has_the_fields_users_and_the_readme_read(name):
    report = json.loads((DEMO_JSON.parent / name).read_text())
    for field in ("machine", "target", "draft", "image_tokens", "max_tokens", "k", "adaptive", "num_requests",
                  "warmup_requests", "outputs_identical", "mean_acceptance_length", "tok_s_none", "tok_s_vispec",
                  "speedup", "speedup_min", "speedup_max", "repeats", "target_step_ms", "draft_forward_ms",
                  "target_step_measured_by", "draft_forward_measured_by", "cost_ratio", "answer_accuracy"):
        assert field in report, field
    speedups = [repeat["speedup"] for repeat in report["repeats"]]
    assert len(speedups) >= 3
    assert report["speedup_min"] == min(speedups) and report["speedup_max"] == max(speedups)
    assert report["speedup_min"] <= report["speedup"] <= report["speedup_max"]
    for repeat in report["repeats"]:
        assert repeat["speedup"] == pytest.approx(repeat["tok_s_vispec"] / repeat["tok_s_none"])
    assert report["cost_ratio"] == pytest.approx(report["draft_forward_ms"] / report["target_step_ms"])
    assert report["outputs_identical"] is True
    assert report["mode"] == ("compiled" if name == "demo_compiled.json" else "eager")
    accuracy = report["answer_accuracy"]
    assert 0 <= accuracy["objects_fully_right"] <= accuracy["objects_named_in_place"] <= accuracy["objects"]


def test_the_warm_up_uses_other_held_out_scenes_than_the_timed_prompts():
    from vispec_vllm.demo.target import RECIPES

    recipe = RECIPES[576]
    timed, warmup = held_out_prompts(recipe, 6), warmup_prompts(recipe, 6, 6)
    timed_seeds = [scene.seed for scenes, _ in timed for scene in scenes]
    warmup_seeds = [scene.seed for scenes, _ in warmup for scene in scenes]
    assert len(timed) == 6 and len(warmup) == 6
    assert [len(scenes) for scenes, _ in timed] == [1, 1, 1, 1, 1, 2]  # one comparison of two images
    assert [len(scenes) for scenes, _ in warmup] == [1] * 6
    assert not set(timed_seeds) & set(warmup_seeds)
    assert set(warmup_seeds) <= set(recipe.scenes.held_out_seeds(200))


def test_the_demo_counts_how_right_its_descriptions_are():
    from vispec_vllm.demo import rich_scenes, scenes
    from vispec_vllm.demo.run import description_accuracy
    from vispec_vllm.demo.target import RECIPES

    examples = held_out_prompts(RECIPES[576], 6)
    described = [scenes_[0] for scenes_, _ in examples if len(scenes_) == 1]
    answers = [scenes_[0].description if len(scenes_) == 1 else "a comparison" for scenes_, _ in examples]
    answers[0] = "There is nothing here."
    accuracy = description_accuracy(rich_scenes, examples, answers)
    objects = sum(len(scene.objects) for scene in described)
    assert accuracy == {"descriptions": len(described), "objects": objects,
                        "objects_named_in_place": objects - len(described[0].objects),
                        "objects_fully_right": objects - len(described[0].objects)}
    assert description_accuracy(scenes, examples, answers) is None  # the 36-token scenes: no per-object checks

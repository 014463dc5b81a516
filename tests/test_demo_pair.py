"""The shipped demo pairs (vispec_vllm/demo/models), at 36 and at 576 image tokens per image:
speculation is lossless on held-out prompts (one image, and on the 576 pair two images), the
trained ViSpec draft is accepted at the rate measured for it, and above the draft trained with the
same budget but its adaptor held at zero (the ablation), on the same prompts; the 576 target
describes held-out scenes correctly."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import chat_tokens, engine_metrics, make_llm, shutdown_llm

from vispec_vllm.demo.models import DEMO_PAIRS
from vispec_vllm.demo.prompts import scene_prompts, with_images
from vispec_vllm.demo.target import RECIPES

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]  # K on every step


@dataclass(frozen=True)
class PairCase:
    image_tokens: int
    num_prompts: int
    max_tokens: int
    k: int
    # The runs are deterministic (float32, greedy, fixed K); each floor sits just below the measured
    # value, so that a drafting change that costs acceptance fails here.
    min_mean_acceptance_length: float


CASES = {
    # Measured 1 + 366 accepted / 136 drafts = 3.69 (positions 1..3: 133, 122, 111 accepted).
    36: PairCase(36, num_prompts=8, max_tokens=128, k=3, min_mean_acceptance_length=3.65),
    # Measured 1 + 623 accepted / 223 drafts = 3.79 (ablation without the adaptor: 3.68).
    576: PairCase(576, num_prompts=4, max_tokens=192, k=5, min_mean_acceptance_length=3.75),
}


MIN_PLACED_RATE_576 = 0.8


@dataclass
class PairRun:
    case: PairCase
    prompts: list[list[dict]]
    baseline: list[list[int]]
    results: dict  # draft kind -> (outputs, mean acceptance length)


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda n: f"{n}-image-tokens")
def pair(request) -> PairRun:
    case = CASES[request.param]
    scenes = RECIPES[case.image_tokens].scenes
    prompts = [scene_prompts(held_out=True, scenes=scenes)(i) for i in range(case.num_prompts)]
    if hasattr(scenes, "compare_messages"):  # a two-image prompt as well
        two = scenes.make_pair(scenes.held_out_seeds(1)[0])
        prompts.append(with_images(scenes.compare_messages(), [two.first.image, two.second.image]))
    target, _ = DEMO_PAIRS[case.image_tokens]
    llm = make_llm(target, limit_mm_per_prompt={"image": 2}, max_model_len=2048)
    baseline = chat_tokens(llm, prompts, case.max_tokens, ignore_eos=False)
    shutdown_llm(llm)
    return PairRun(case, prompts, baseline, {})


def speculate(run: PairRun, kind: str) -> tuple[list[list[int]], float]:
    """Outputs and mean acceptance length (vLLM's definition: 1 + accepted / drafts) of one draft."""
    if kind not in run.results:
        target, drafts = DEMO_PAIRS[run.case.image_tokens]
        llm = make_llm(target, limit_mm_per_prompt={"image": 2}, max_model_len=2048, disable_log_stats=False,
                       speculative_config={"model": str(drafts[kind]), "num_speculative_tokens": run.case.k})
        try:
            outputs = chat_tokens(llm, run.prompts, run.case.max_tokens, ignore_eos=False)
            metrics = engine_metrics(llm)
        finally:
            shutdown_llm(llm)
        drafts_made = metrics["vllm:spec_decode_num_drafts"]
        assert metrics["vllm:spec_decode_num_draft_tokens"] == run.case.k * drafts_made > 0
        run.results[kind] = outputs, 1 + metrics["vllm:spec_decode_num_accepted_tokens"] / drafts_made
    return run.results[kind]


def test_vispec_demo_draft_is_lossless_and_accepted(pair):
    outputs, mean_acceptance_length = speculate(pair, "vispec")
    assert outputs == pair.baseline
    assert mean_acceptance_length > pair.case.min_mean_acceptance_length


def test_the_adaptor_raises_acceptance(pair):
    outputs, no_adaptor = speculate(pair, "vispec-no-adaptor")
    assert outputs == pair.baseline
    assert speculate(pair, "vispec")[1] > no_adaptor


def test_the_576_target_describes_held_out_scenes(pair):
    """Held-out descriptions (vLLM, no speculation) name objects at their places; the shipped target
    gets number labels mostly wrong (benchmarks/results/description_accuracy_576.json), so the
    floor is on colour, shape and place."""
    if pair.case.image_tokens != 576:
        pytest.skip("the 36-token target's accuracy is measured by benchmarks/description_accuracy.py")
    from transformers import AutoTokenizer

    scenes = RECIPES[576].scenes
    tokenizer = AutoTokenizer.from_pretrained(DEMO_PAIRS[576][0])
    described = [scenes.make_scene(seed) for seed in scenes.held_out_seeds(pair.case.num_prompts)]
    placed, total = 0, 0
    for scene, prompt, tokens in zip(described, pair.prompts, pair.baseline, strict=False):
        if len(prompt[0]["content"]) != 2:  # a comparison prompt (two images)
            continue
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        placed += scenes.objects_named_in_place(text, scene.objects)
        total += len(scene.objects)
    # Measured 19 of 21 objects here (84% of 352 over 50 held-out scenes in the benchmark).
    assert total and placed / total >= MIN_PLACED_RATE_576, (placed, total)

"""The shipped demo pair (vispec_vllm/demo/models): speculation is lossless on held-out scenes,
the trained ViSpec draft is accepted at the rate measured for it, and above the draft trained with
the same budget but its adaptor held at zero (the ablation), on the same scenes."""

from __future__ import annotations

import pytest
from conftest import chat_tokens, engine_metrics, make_llm, shutdown_llm

from vispec_vllm.demo.models import DEMO_DRAFTS, DEMO_TARGET
from vispec_vllm.training.data import scene_prompts

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]  # K=3 on every step

NUM_SCENES = 8
MAX_TOKENS = 128  # the descriptions end (EOS) before this
K = 3
# The run is deterministic (float32, greedy, fixed K): measured 1 + 366 accepted / 136 drafts = 3.69
# (positions 1..3: 133, 122, 111 accepted). The floor sits just below, so that a drafting change
# that costs acceptance fails here.
MIN_MEAN_ACCEPTANCE_LENGTH_K3 = 3.65


@pytest.fixture(scope="module")
def held_out_scenes() -> list[list[dict]]:
    prompt = scene_prompts(held_out=True)
    return [prompt(i) for i in range(NUM_SCENES)]


@pytest.fixture(scope="module")
def baseline(held_out_scenes) -> list[list[int]]:
    llm = make_llm(DEMO_TARGET, limit_mm_per_prompt={"image": 1})
    outputs = chat_tokens(llm, held_out_scenes, MAX_TOKENS, ignore_eos=False)
    shutdown_llm(llm)
    return outputs


def speculate(draft: str, conversations) -> tuple[list[list[int]], float]:
    """Outputs and mean acceptance length (vLLM's definition: 1 + accepted / drafts) of one draft."""
    llm = make_llm(DEMO_TARGET, limit_mm_per_prompt={"image": 1}, disable_log_stats=False,
                   speculative_config={"model": str(DEMO_DRAFTS[draft]), "num_speculative_tokens": K})
    try:
        outputs = chat_tokens(llm, conversations, MAX_TOKENS, ignore_eos=False)
        metrics = engine_metrics(llm)
    finally:
        shutdown_llm(llm)
    assert metrics["vllm:spec_decode_num_draft_tokens"] == K * metrics["vllm:spec_decode_num_drafts"] > 0
    return outputs, 1 + metrics["vllm:spec_decode_num_accepted_tokens"] / metrics["vllm:spec_decode_num_drafts"]


@pytest.fixture(scope="module")
def vispec_run(held_out_scenes) -> tuple[list[list[int]], float]:
    return speculate("vispec", held_out_scenes)


def test_vispec_demo_draft_is_lossless_and_accepted(baseline, vispec_run):
    outputs, mean_acceptance_length = vispec_run
    assert outputs == baseline
    assert mean_acceptance_length > MIN_MEAN_ACCEPTANCE_LENGTH_K3


def test_the_adaptor_raises_acceptance(held_out_scenes, baseline, vispec_run):
    # The ablation (measured 3.52 here) differs from ViSpec only in its adaptor, held at zero in training.
    outputs, no_adaptor = speculate("vispec-no-adaptor", held_out_scenes)
    assert outputs == baseline
    assert vispec_run[1] > no_adaptor

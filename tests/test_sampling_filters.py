"""Top-k and top-p with speculation (the shipped demo pair, K=3).

At temperature 1, top_k=1 or a tiny top_p leaves one token at each position: the target's argmax.
So the outputs must equal greedy decoding exactly, without speculation and with it. With it, the
target's distribution at every verified position is one-hot, and vLLM's EAGLE drafts are argmax
drafts, so a draft token is accepted exactly when greedy verification accepts it: the accepted
counts per draft position must equal those of the greedy run. A rejection sampler that applies
the filters (or the temperature) wrongly at the verified positions fails both.
"""

from __future__ import annotations

import pytest
from conftest import make_llm, shutdown_llm

from vispec_vllm.demo.models import DEMO_DRAFTS, DEMO_TARGET
from vispec_vllm.demo.prompts import scene_prompts

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]

K = 3
NUM_SCENES = 4
MAX_TOKENS = 48
FILTERS = {"greedy": {"temperature": 0.0}, "top_k=1": {"temperature": 1.0, "top_k": 1},
           "tiny top_p": {"temperature": 1.0, "top_p": 1e-6}}


@pytest.fixture(scope="module")
def scenes() -> list[list[dict]]:
    prompt = scene_prompts(held_out=True)
    return [prompt(i) for i in range(NUM_SCENES)]


def spec_counters(llm) -> tuple[int, list[int]]:
    metrics = {m.name: m for m in llm.get_metrics()}
    per_position = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    return metrics["vllm:spec_decode_num_drafts"].value, list(per_position)


def run_filter(llm, scenes, name: str, speculative: bool) -> tuple[list[list[int]], int, list[int]]:
    """Outputs, and (with speculation) drafts and accepted tokens per position in this run."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=MAX_TOKENS, seed=i, **FILTERS[name]) for i in range(len(scenes))]
    before = spec_counters(llm) if speculative else (0, [0] * K)
    outputs = [list(o.outputs[0].token_ids) for o in llm.chat(scenes, params, use_tqdm=False)]
    after = spec_counters(llm) if speculative else (0, [0] * K)
    return outputs, after[0] - before[0], [a - b for a, b in zip(after[1], before[1], strict=True)]


@pytest.fixture(scope="module")
def target_alone(scenes) -> dict[str, list[list[int]]]:
    llm = make_llm(DEMO_TARGET, limit_mm_per_prompt={"image": 1})
    try:
        return {name: run_filter(llm, scenes, name, speculative=False)[0] for name in FILTERS}
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="module")
def vispec_llm(target_alone):  # built once the target-alone engine is gone
    llm = make_llm(DEMO_TARGET, limit_mm_per_prompt={"image": 1}, disable_log_stats=False,
                   speculative_config={"model": str(DEMO_DRAFTS["vispec"]), "num_speculative_tokens": K})
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def vispec_greedy(vispec_llm, scenes):
    return run_filter(vispec_llm, scenes, "greedy", speculative=True)


@pytest.mark.parametrize("name", ["top_k=1", "tiny top_p"])
def test_one_token_filters_at_temperature_1_equal_greedy_without_speculation(target_alone, name):
    assert all(len(output) > 8 for output in target_alone["greedy"])
    assert target_alone[name] == target_alone["greedy"]


# top_p first: a failure that kills the engine (vLLM's CPU top-k path on a step without drafts) then
# leaves the other filter's result standing.
@pytest.mark.parametrize("name", ["tiny top_p", "top_k=1"])
def test_one_token_filters_at_temperature_1_equal_greedy_with_speculation(target_alone, vispec_greedy, vispec_llm,
                                                                          scenes, name):
    greedy_outputs, greedy_drafts, greedy_accepted = vispec_greedy
    assert greedy_outputs == target_alone["greedy"]  # lossless greedy, the premise
    outputs, drafts, accepted = run_filter(vispec_llm, scenes, name, speculative=True)
    assert outputs == greedy_outputs
    assert (drafts, accepted) == (greedy_drafts, greedy_accepted)
    assert accepted[0] > 0.8 * drafts > 0  # and the trained draft is mostly accepted

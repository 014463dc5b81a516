"""An image whose state the proposer evicted, met again through a prefix-cache hit (tiny LLaVA, CPU).

The proposer keeps one image (VISPEC_VLLM_IMAGE_STATE_CAPACITY=1) and vLLM's encoder cache two
(max_num_batched_tokens=32 sizes it; a tiny-LLaVA image is 16 tokens). After images A, B and C,
A is in neither; asking about A again hits the prefix cache for A's tokens, so the encoder does
not run: the step misses A's state. The miss is counted (proposer state, the Prometheus counter
`vispec:image_state_misses_total`), and outputs still equal the target's alone.
"""

from __future__ import annotations

import pytest
from conftest import chat_tokens, image_part, make_llm, model_runner_of, shutdown_llm, text_part

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]

SCHEDULING = {"max_num_batched_tokens": 32}
DESCRIBE = text_part("Describe the image in detail. Say which shapes you see, their colours, sizes and "
                     "positions, and count the objects on the left and on the right.")
CONVERSATIONS = [[{"role": "user", "content": [image_part(colour, shape), DESCRIBE]}]
                 for colour, shape in (("red", "ellipse"), ("blue", "rectangle"), ("green", "ellipse"),
                                       ("red", "ellipse"))]  # the last one is A again


def misses_counter_value() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("vispec:image_state_misses_total") or 0.0


@pytest.fixture(scope="module")
def outputs(tiny_models):
    target = tiny_models / "tiny-llava"
    baseline_llm = make_llm(target, **SCHEDULING)
    baseline = [chat_tokens(baseline_llm, [conversation]) for conversation in CONVERSATIONS]
    shutdown_llm(baseline_llm)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VISPEC_VLLM_IMAGE_STATE_CAPACITY", "1")
        llm = make_llm(target, speculative_config={"model": str(tiny_models / "tiny-llava-vispec"),
                                                   "num_speculative_tokens": 3},
                       disable_log_stats=False, **SCHEDULING)
    drafter = model_runner_of(llm).drafter
    counter_before = misses_counter_value()
    misses = []
    spec = []
    for conversation in CONVERSATIONS:  # one at a time: A, B, C, then A again
        spec.append(chat_tokens(llm, [conversation]))
        misses.append(drafter.state.image_state_misses)
    counter_gained = misses_counter_value() - counter_before
    yield {"baseline": baseline, "spec": spec, "misses": misses, "counter_gained": counter_gained,
           "capacity": drafter.state.capacity, "cached": list(drafter.state.images)}
    shutdown_llm(llm)


def test_evicted_image_is_a_counted_miss(outputs):
    assert outputs["capacity"] == 1 and len(outputs["cached"]) == 1
    assert outputs["misses"][:3] == [0, 0, 0]  # A, B, C: each encoded, so found
    assert outputs["misses"][3] >= 1  # A again: in neither cache, encoder skipped
    assert outputs["counter_gained"] == outputs["misses"][3]


def test_outputs_are_still_the_targets(outputs):
    assert outputs["spec"] == outputs["baseline"]

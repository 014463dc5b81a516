"""ViSpec drafting inside vLLM, for each target family (tiny random models, CPU, float32).

- lossless: greedy outputs with ViSpec speculation equal the target alone, on a batch mixing
  image+text, text-only and two-image prompts; with prefix-cache hits, chunked prefill and
  preemption forced by a small KV cache;
- fidelity: an independent pure-PyTorch ViSpec draft (tests/vispec_reference.py), given the same
  checkpoint, prompt and target hidden states, proposes the plugin's draft tokens step by step;
- the draft uses the image: another image, or a zeroed adaptor, changes the proposals.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    chat_tokens,
    engine_metrics,
    image_part,
    make_llm,
    mixed_conversations,
    model_runner_of,
    shutdown_llm,
    text_part,
)
from proposal_recorder import record_proposals as record
from vispec_reference import ReferenceViSpecDraft, target_lm_head

from vispec_vllm.proposer_state import ViSpecProposerState
from vispec_vllm.row_plan import ImageSpan, dropped_key_blocks

FAMILIES = ["tiny-llava", "tiny-llava-next", "tiny-qwen2_5_vl"]
NUM_SPECULATIVE_TOKENS = 3
TWO_IMAGE_PROMPT = [{"role": "user", "content": [image_part("purple"), text_part("What is left?"),
                                                 image_part("orange", "rectangle"), text_part("And right?")]}]


# Drafting is examined at a fixed K: load-adaptive speculation (tests/test_adaptive_speculation.py)
# would vary it per step, down to 1 for these random tiny drafts.
pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]


def vispec_config(draft_dir, k: int = NUM_SPECULATIVE_TOKENS) -> dict:
    # Exactly what a user writes for a published checkpoint: no method, no conversion.
    return {"model": str(draft_dir), "num_speculative_tokens": k}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_models):
    name = request.param
    baseline_llm = make_llm(tiny_models / name)
    baseline = chat_tokens(baseline_llm, mixed_conversations())
    shutdown_llm(baseline_llm)
    return name, tiny_models / name, tiny_models / f"{name}-vispec", baseline


@pytest.fixture(scope="module")
def spec_llm(family):
    _, target, draft, _ = family
    llm = make_llm(target, speculative_config=vispec_config(draft), disable_log_stats=False)
    yield llm
    shutdown_llm(llm)


def test_vispec_draft_is_in_use(spec_llm):
    runner = model_runner_of(spec_llm)
    assert type(runner.drafter).__name__ == "ViSpecProposer"
    assert type(runner.drafter.model).__name__ == "ViSpecDraftModel"


def test_lossless_with_prefix_cache_hits(family, spec_llm):
    *_, baseline = family
    assert chat_tokens(spec_llm, mixed_conversations()) == baseline
    # Same prompts again: image prefixes now come from the prefix cache (encoder skipped).
    assert chat_tokens(spec_llm, mixed_conversations()) == baseline
    metrics = engine_metrics(spec_llm)
    assert metrics["vllm:prefix_cache_hits"] > 0
    assert metrics["vllm:spec_decode_num_draft_tokens"] > 0


def test_fidelity_against_independent_reference(family, spec_llm):
    _, target, draft, _ = family
    drafter = model_runner_of(spec_llm).drafter
    # Where an image fills whole KV blocks with dropped rows, the draft's attention skips them
    # (ViSpecProposerState.key_blocks_read); the reference attends over every row, masking them.
    reads = []
    drafter.state.key_blocks_read = lambda *args: reads.append(ViSpecProposerState.key_blocks_read(
        drafter.state, *args)) or reads[-1]
    try:
        recorder, sequence = record(spec_llm, TWO_IMAGE_PROMPT)
    finally:
        del drafter.state.key_blocks_read
    assert len(recorder.images) == 2 and len(recorder.steps) >= 5
    reference = ReferenceViSpecDraft(draft, target_lm_head(target))
    images = sorted(recorder.images.values(), key=lambda image: image[0])
    spans = [ImageSpan(offset, length) for offset, length, _ in images]
    whole_blocks = dropped_key_blocks(spans, drafter.draft.num_q, drafter.block_size).size
    assert any(read is not None for read in reads) == bool(whole_blocks)
    for step in recorder.steps:
        assert step.next_token == sequence[step.last_row + 1]
        expected = reference.propose(sequence[: step.last_row + 2], recorder.target_hidden, images,
                                     step.last_row, NUM_SPECULATIVE_TOKENS)
        assert step.proposals == expected, f"step at row {step.last_row}"


def test_proposals_depend_on_the_image(spec_llm):
    describe = text_part("Describe the image in detail.")
    red, _ = record(spec_llm, [{"role": "user", "content": [image_part("red"), describe]}])
    blue, _ = record(spec_llm, [{"role": "user", "content": [image_part("blue", "rectangle"), describe]}])
    assert [s.proposals for s in red.steps] != [s.proposals for s in blue.steps]


def test_zeroed_adaptor_changes_proposals_not_outputs(spec_llm):
    drafter = model_runner_of(spec_llm).drafter
    adaptor_out = drafter.model.imadpt.o_proj.weight
    before, sequence = record(spec_llm, TWO_IMAGE_PROMPT)
    saved = adaptor_out.detach().clone()
    drafter.state.images.clear()  # the cached compressed images came from the intact adaptor
    try:
        with torch.no_grad():
            adaptor_out.zero_()
        zeroed, zeroed_sequence = record(spec_llm, TWO_IMAGE_PROMPT)
    finally:
        with torch.no_grad():
            adaptor_out.copy_(saved)
        drafter.state.images.clear()
    assert zeroed_sequence == sequence  # outputs are the target's alone
    assert [s.proposals for s in zeroed.steps] != [s.proposals for s in before.steps]


@pytest.mark.parametrize("scheduling", [
    pytest.param({"max_num_batched_tokens": 48}, id="chunked-prefill"),
    pytest.param({"num_gpu_blocks_override": 12, "max_model_len": 320}, id="preemption"),
])
def test_lossless_under_scheduling_pressure(family, scheduling):
    # Last in the module: building and shutting down a second in-process engine tears down
    # vLLM's process-wide parallel state, which `spec_llm` needs while it is in use.
    _, target, draft, baseline = family
    llm = make_llm(target, speculative_config=vispec_config(draft), disable_log_stats=False, **scheduling)
    try:
        assert chat_tokens(llm, mixed_conversations()) == baseline
        if "num_gpu_blocks_override" in scheduling:
            assert engine_metrics(llm)["vllm:num_preemptions"] > 0
    finally:
        shutdown_llm(llm)

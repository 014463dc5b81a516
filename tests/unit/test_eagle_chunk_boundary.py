"""patches/eagle_chunk_boundary.py: the draft's token at the end of a prefill chunk, and its loud failures.

The fix itself is checked end to end by tests/test_proposal_equality.py (chunked prefill proposes
as each request alone); here, without an engine, what it reads from the runner and that it stops
vLLM, naming itself, where it cannot work instead of switching itself off.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

PROMPTS = {"a": [10, 11, 12, 13, 14, 15], "b": [20, 21, 22], "c": [30, 31, 32, 33, 34]}


@pytest.fixture(scope="module", autouse=True)
def patches():
    import vispec_vllm

    vispec_vllm.register()


class Request:
    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    def get_token_id(self, index: int) -> int:
        return self.token_ids[index]


def runner_and_batch(discarded: list[bool], seq_lens: list[int]):
    """The two runner buffers the fix reads (as GPUModelRunner holds them), and an input batch."""
    num_reqs = len(discarded)
    runner = SimpleNamespace(discard_request_mask=SimpleNamespace(np=np.array([*discarded, False, False])),
                             optimistic_seq_lens_cpu=torch.tensor([*seq_lens, 0, 0], dtype=torch.int32))
    batch = SimpleNamespace(num_reqs=num_reqs, req_ids=list(PROMPTS)[:num_reqs])
    return runner, batch


def test_partial_prefills_get_the_prompt_token_after_their_chunk():
    from vispec_vllm.patches.eagle_chunk_boundary import next_prompt_token_ids

    requests = {req_id: Request(tokens) for req_id, tokens in PROMPTS.items()}
    # "a" has computed 4 of 6 prompt tokens (chunk ends before token 4), "b" decodes, "c" 2 of 5.
    runner, batch = runner_and_batch([True, False, True], [4, 3, 2])
    rows, tokens = next_prompt_token_ids(runner, requests, batch)
    assert rows.tolist() == [0, 2] and tokens == [14, 32]


def test_a_runner_without_the_buffers_stops_the_engine_naming_the_patch():
    from vispec_vllm.patches._wrap import PatchError
    from vispec_vllm.patches.eagle_chunk_boundary import next_prompt_token_ids

    runner, batch = runner_and_batch([True], [4])
    del runner.optimistic_seq_lens_cpu
    with pytest.raises(PatchError, match=r"^vispec-vllm patch eagle_chunk_boundary .*no optimistic_seq_lens_cpu"):
        next_prompt_token_ids(runner, {"a": Request(PROMPTS["a"])}, batch)


def test_a_proposer_built_without_a_runner_stops_start_up_naming_the_patch():
    # The model runner builds EagleProposer(vllm_config, device, runner); without the runner the fix
    # would have nothing to read. The patch refuses before vLLM's own __init__ looks at the config.
    from vispec_vllm.patches._wrap import PatchError
    from vllm.v1.spec_decode.eagle import EagleProposer

    with pytest.raises(PatchError, match=r"^vispec-vllm patch eagle_chunk_boundary .*EagleProposer without its "
                                         r"model runner"):
        EagleProposer(SimpleNamespace(speculative_config=None), torch.device("cpu"))

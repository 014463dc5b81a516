"""Patch: the right draft input token at the end of a prefill chunk, for every EAGLE-style draft.

vLLM functions: `vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.__init__` and
`SpecDecodeBaseProposer.prepare_next_token_ids_padded` (vLLM 0.32.0), in the worker process.
Draft row i pairs the target's hidden state h_i with the next token x_{i+1}. For a request in the
middle of a chunked prefill (its sampled token is discarded), the chunk's last row ends at token
position s = num_computed + num_scheduled, so its next token is the prompt token at s. vLLM's
padded drafter batch (the default) takes the "backup" token `get_token_id(num_tokens_no_spec - 1)`
instead: the request's last prompt token. The draft therefore writes a wrong key/value at every
chunk boundary into its KV cache, and every later draft of that request attends to it. Outputs
stay the target's (verification is exact); acceptance drops, and a request's proposals depend on
how the scheduler happened to chunk it. vLLM's unpadded path
(`prepare_next_token_ids_cpu`) already uses `get_token_id(s)`.

The wrapper keeps vLLM's result for every request and rewrites only the discarded ones (the
partial prefills, `discard_request_mask`) with `get_token_id(s)`, s from the runner's
`optimistic_seq_lens_cpu`; a loop over those requests only, on host copies vLLM already holds.
`__init__` is wrapped to keep the runner, which vLLM passes to the proposer but does not store.
The fix cannot work without that runner, so it fails loudly instead of switching itself off: a
proposer built without one stops start-up with a `PatchError` naming this unit, and a runner
without the two buffers it reads stops the engine the same way at the first padded drafter
batch. It can go when vLLM's padded path picks the token after the chunk (docs/upstream.md §3).
"""

from __future__ import annotations

import numpy as np
import torch
from vispec_vllm.patches._wrap import PatchError, wrap

RUNNER_BUFFERS = ("discard_request_mask", "optimistic_seq_lens_cpu")  # what the fix reads from the runner


def _make_init(original):
    def __init__(self, vllm_config, device, *args, **kwargs) -> None:
        # SpecDecodeBaseProposer(vllm_config, device, pass_hidden_states_to_model, runner=None)
        runner = kwargs.get("runner", args[1] if len(args) > 1 else None)
        if runner is None:
            raise PatchError(__name__, f"vLLM built {type(self).__name__} without its model runner (the `runner` "
                                       "argument); the chunk-boundary fix reads the runner's "
                                       f"{' and '.join(RUNNER_BUFFERS)}")
        original(self, vllm_config, device, *args, **kwargs)
        self.vispec_runner = runner

    return __init__


def next_prompt_token_ids(runner, requests, input_batch) -> tuple[np.ndarray, list[int]]:
    """Batch rows of the partial prefills, and the prompt token each one's chunk ends before."""
    missing = [name for name in RUNNER_BUFFERS if not hasattr(runner, name)]
    if missing:
        raise PatchError(__name__, f"the model runner ({type(runner).__name__}) has no {', '.join(missing)}")
    num_reqs = input_batch.num_reqs
    rows = np.flatnonzero(runner.discard_request_mask.np[:num_reqs])
    seq_lens = runner.optimistic_seq_lens_cpu[:num_reqs].numpy()
    tokens = [requests[input_batch.req_ids[row]].get_token_id(int(seq_lens[row])) for row in rows]
    return rows, tokens


def _make_prepare_next_token_ids_padded(original):
    def prepare_next_token_ids_padded(self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask):
        next_token_ids, valid_sampled_tokens_count = original(self, sampled_token_ids, requests, gpu_input_batch,
                                                              discard_request_mask)
        rows, tokens = next_prompt_token_ids(self.vispec_runner, requests, gpu_input_batch)
        if len(rows):
            next_token_ids[torch.from_numpy(rows).to(next_token_ids.device)] = torch.tensor(
                tokens, dtype=next_token_ids.dtype).to(next_token_ids.device)
        return next_token_ids, valid_sampled_tokens_count

    return prepare_next_token_ids_padded


def apply() -> None:
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    wrap(SpecDecodeBaseProposer, "__init__", _make_init)
    wrap(SpecDecodeBaseProposer, "prepare_next_token_ids_padded", _make_prepare_next_token_ids_padded)

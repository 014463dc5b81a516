"""patches/request_kind_metrics.py on vLLM's own OutputProcessor: per-kind counters, and no leak on abort.

Drives a real `OutputProcessor` (no engine) the way `AsyncLLM` does for a streaming request: add
it with an output queue, deliver some tokens, then `abort_requests([id], internal=True)`, which is
what a client disconnect ends in (AsyncLLM.generate's CancelledError / GeneratorExit handler).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sized

import pytest
from prometheus_client import REGISTRY
from vispec_vllm.patches import request_kind_metrics
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

NUM_STREAMS = 1000
KINDS = ("image", "text")
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


@pytest.fixture(scope="module", autouse=True)
def patched():
    request_kind_metrics.apply()


def make_request(request_id: str, with_image: bool) -> EngineCoreRequest:
    image = MultiModalFeatureSpec(data=None, modality="image", identifier=f"hash-{request_id}",
                                  mm_position=PlaceholderRange(offset=1, length=4))
    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=[1, 7, 7, 7, 7, 2, 3], mm_features=[image] if with_image else None,
        sampling_params=SamplingParams(max_tokens=32, output_kind=RequestOutputKind.DELTA), pooling_params=None,
        arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None,
        external_req_id=f"external-{request_id}")


def spec_metrics(num_spec_tokens: int, accepted_per_step: list[int]) -> RequestSpecDecodeMetrics:
    metrics = RequestSpecDecodeMetrics.new(num_spec_tokens)
    for accepted in accepted_per_step:
        metrics.observe(num_spec_tokens, accepted)
    return metrics


def counter_values() -> dict[tuple[str, str], float]:
    return {(name, kind): REGISTRY.get_sample_value(f"vispec:spec_decode_{name}_total", {"prompt": kind}) or 0.0
            for name in COUNTERS for kind in KINDS}


def container_sizes(processor: OutputProcessor) -> dict[str, int]:
    """Size of every container the processor holds: any per-request side table shows up here."""
    return {name: len(value) for name, value in vars(processor).items()
            if isinstance(value, Sized) and not isinstance(value, str)}


@pytest.mark.parametrize("per_request_metrics", ["none", "summary"])
def test_aborted_streams_leave_nothing_behind(per_request_metrics):
    processor = OutputProcessor(tokenizer=None, log_stats=False)
    empty = container_sizes(processor)
    counters_before = counter_values()
    states = []
    for i in range(NUM_STREAMS):
        request = make_request(f"req-{i}", with_image=i % 2 == 0)
        queue = RequestOutputCollector(RequestOutputKind.DELTA, request.request_id)
        processor.add_request(request, prompt=None, queue=queue)
        states.append(weakref.ref(processor.request_states[request.request_id]))
        # Some tokens stream out; vLLM's scheduler attaches per-request metrics to the finishing
        # output only, so a stream cut short never carries them, whatever the metrics level.
        processor.process_outputs([EngineCoreOutput(request_id=request.request_id, new_token_ids=[5, 6])])
        assert processor.abort_requests([request.request_id], internal=True) == [request.request_id]
        assert queue.get_nowait().finished  # the client side got vLLM's abort output
    gc.collect()
    assert container_sizes(processor) == empty
    assert not any(vars(processor)[name] for name in empty)
    assert all(state() is None for state in states)  # the per-request flags went with vLLM's states
    assert counter_values() == counters_before  # aborted requests are not counted


@pytest.mark.parametrize("per_request_metrics", ["none", "summary"])
def test_finished_requests_are_counted_by_prompt_kind(per_request_metrics):
    processor = OutputProcessor(tokenizer=None, log_stats=False)
    empty = container_sizes(processor)
    counters_before = counter_values()
    # (has image, accepted draft tokens per verify step), K = 3.
    finished = [(True, [3, 1]), (False, [0, 0, 2]), (True, [2]), (False, [])]
    expected = {key: 0.0 for key in counters_before}
    for i, (with_image, accepted_per_step) in enumerate(finished):
        request = make_request(f"done-{i}", with_image)
        processor.add_request(request, prompt=None, queue=RequestOutputCollector(RequestOutputKind.DELTA,
                                                                                 request.request_id))
        metrics = spec_metrics(3, accepted_per_step) if per_request_metrics != "none" else None
        processor.process_outputs([EngineCoreOutput(request_id=request.request_id, new_token_ids=[9],
                                                    finish_reason=FinishReason.LENGTH, spec_decode_metrics=metrics)])
        if metrics is not None:
            kind = "image" if with_image else "text"
            expected["num_drafts", kind] += len(accepted_per_step)
            expected["num_draft_tokens", kind] += 3 * len(accepted_per_step)
            expected["num_accepted_tokens", kind] += sum(accepted_per_step)
    after = counter_values()
    assert {key: after[key] - counters_before[key] for key in after} == expected
    assert container_sizes(processor) == empty

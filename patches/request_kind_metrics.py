"""Patch: speculative acceptance split by requests with and without images, on `/metrics`.

vLLM functions: `vllm.v1.engine.output_processor.OutputProcessor.add_request` and
`OutputProcessor._finish_request` (vLLM 0.32.0), in the API-server process (the caller's, for
`LLM`). Why: vLLM's `vllm:spec_decode_*` counters pool all requests, but on a vision model drafts
for image prompts and for text prompts behave differently (that is the point of ViSpec), and
operators need to see both. When per-request speculative metrics are on
(`--per-request-spec-decode-metrics summary` or `detailed`, which makes vLLM track them), each
finished request adds its verify steps, proposed and accepted draft tokens to

    vispec:spec_decode_num_drafts_total{prompt="image"|"text"}
    vispec:spec_decode_num_draft_tokens_total{prompt=...}
    vispec:spec_decode_num_accepted_tokens_total{prompt=...}

(mean acceptance length per kind = 1 + accepted / drafts). Otherwise nothing is recorded.

Whether a request has an image is kept on vLLM's own `RequestState` (`vispec_has_image`), not in
a table of our own: the flag lives and dies with the state, whichever path drops it. (vLLM's
`abort_requests`, the path of every client disconnect, pops the state without `_finish_request`;
a side table keyed by request id leaked one entry per aborted request.) Aborted requests carry no
per-request metrics (vLLM sends them with the finishing output only) and are not counted.
"""

from __future__ import annotations

from vispec_vllm.patches._wrap import wrap

_counters = None


def _get_counters():
    global _counters
    if _counters is None:
        from prometheus_client import Counter

        def counter(name: str, doc: str):
            return Counter(f"vispec:spec_decode_{name}", doc, labelnames=["prompt"])

        _counters = {
            "drafts": counter("num_drafts", "Verify steps with drafts, by prompt kind (image or text)."),
            "draft_tokens": counter("num_draft_tokens", "Proposed draft tokens, by prompt kind."),
            "accepted": counter("num_accepted_tokens", "Accepted draft tokens, by prompt kind."),
        }
    return _counters


def record_finished_request(has_image: bool, spec_decode_metrics) -> None:
    summary = spec_decode_metrics.to_dict()
    kind = "image" if has_image else "text"
    counters = _get_counters()
    counters["drafts"].labels(prompt=kind).inc(summary["num_spec_steps"])
    counters["draft_tokens"].labels(prompt=kind).inc(summary["num_draft_tokens"])
    counters["accepted"].labels(prompt=kind).inc(summary["num_accepted_draft_tokens"])


def _make_add_request(original_add_request):
    def add_request(self, request, *args, **kwargs) -> None:
        original_add_request(self, request, *args, **kwargs)
        # A resumable (streaming-input) request comes back here with each new input chunk.
        req_state = self.request_states.get(request.request_id)
        if req_state is not None and request.mm_features:
            req_state.vispec_has_image = True

    return add_request


def _make_finish_request(original_finish_request):
    def _finish_request(self, req_state) -> None:
        if req_state.spec_decode_metrics is not None:
            record_finished_request(getattr(req_state, "vispec_has_image", False), req_state.spec_decode_metrics)
        return original_finish_request(self, req_state)

    return _finish_request


def apply() -> None:
    from vllm.v1.engine.output_processor import OutputProcessor

    wrap(OutputProcessor, "add_request", _make_add_request)
    wrap(OutputProcessor, "_finish_request", _make_finish_request)

"""Patch: the worker hands a step's draft tokens back with its sampled tokens, saving the engine
core one call to the worker per speculative step.

vLLM functions: `vllm.v1.worker.gpu_worker.Worker.sample_tokens` (worker; the CPU worker inherits
it), and `sample_tokens` and `take_draft_token_ids` of the executors `v1.executor.abstract.Executor`,
`multiproc_executor.MultiprocExecutor` and `uniproc_executor.UniProcExecutor` (engine core); vLLM
0.32.0.
Why: without asynchronous scheduling (vLLM's CPU backend has none) a speculative engine step makes
three calls to the worker: `execute_model`, `sample_tokens`, then `take_draft_token_ids` from
`EngineCore.post_step`, although the worker proposed the drafts inside `sample_tokens`. Across
processes each call is a round trip through the shared-memory queues: on the 2-core demo machine
(demo pair, ViSpec at K=5, one request at a time, a temporary timer around the worker's calls) the
worker sat idle between calls 1.41-1.54 ms per step with three calls and 1.03-1.12 ms with two, of
a ~17.5 ms step. Here the worker attaches its model runner's `take_draft_token_ids()` to the
`ModelRunnerOutput` it returns (the same value, read the same way, at the end of the same call);
the executor keeps it from `sample_tokens` and returns it from the next `take_draft_token_ids`
without calling the worker. Every speculative method gains alike (vLLM's own EAGLE too); the
drafts the scheduler receives are unchanged.
Guard: the worker attaches nothing under asynchronous scheduling (where the engine takes no drafts
this way) or to vLLM's shared empty output; a `sample_tokens` that returns a future (the pipelined
batch queue) or an output without drafts attached leaves nothing kept, and `take_draft_token_ids`
then calls the worker as vLLM does. What is kept is handed out once.
"""

from __future__ import annotations

from vispec_vllm.patches._wrap import wrap

# The attribute a ModelRunnerOutput carries its step's drafts in (a DraftTokenIds, or None for a
# step without drafts), and the executor's attribute that keeps them until the engine takes them.
OUTPUT_ATTRIBUTE = "vispec_draft_token_ids"
KEPT_ATTRIBUTE = "vispec_draft_token_ids_of_step"
NOTHING_KEPT = object()


def _make_worker_sample_tokens(original):
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        runner = self.model_runner
        if (runner.num_spec_tokens and not runner.use_async_scheduling and isinstance(output, ModelRunnerOutput)
                and output is not EMPTY_MODEL_RUNNER_OUTPUT):
            setattr(output, OUTPUT_ATTRIBUTE, runner.take_draft_token_ids())
        return output

    return sample_tokens


def _make_executor_sample_tokens(original):
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        # Rewritten on every call, so drafts never outlive the step that proposed them.
        setattr(self, KEPT_ATTRIBUTE, getattr(output, OUTPUT_ATTRIBUTE, NOTHING_KEPT))
        return output

    return sample_tokens


def _make_take_draft_token_ids(original):
    def take_draft_token_ids(self):
        kept = getattr(self, KEPT_ATTRIBUTE, NOTHING_KEPT)
        if kept is NOTHING_KEPT:
            return original(self)
        setattr(self, KEPT_ATTRIBUTE, NOTHING_KEPT)
        return kept

    return take_draft_token_ids


def apply() -> None:
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor
    from vllm.v1.worker.gpu_worker import Worker

    wrap(Worker, "sample_tokens", _make_worker_sample_tokens)
    # Each executor class that defines its own sample_tokens / take_draft_token_ids.
    for executor in (Executor, MultiprocExecutor, UniProcExecutor):
        wrap(executor, "sample_tokens", _make_executor_sample_tokens)
        wrap(executor, "take_draft_token_ids", _make_take_draft_token_ids)

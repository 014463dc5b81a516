"""patches/draft_tokens_with_output.py: a step's drafts travel back with its sampled tokens, and the
executor hands them to the engine once, calling the worker only when nothing came back. No engine:
the replacements are built around stand-ins for vLLM's originals."""

from __future__ import annotations

from types import SimpleNamespace

from vispec_vllm.patches import draft_tokens_with_output as unit
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, ModelRunnerOutput


def worker_with_drafts(drafts, *, num_spec_tokens: int = 3, use_async_scheduling: bool = False):
    runner = SimpleNamespace(num_spec_tokens=num_spec_tokens, use_async_scheduling=use_async_scheduling,
                             take_draft_token_ids=lambda: drafts)
    return SimpleNamespace(model_runner=runner)


def step_output() -> ModelRunnerOutput:
    return ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1})


class ExecutorStandIn:
    """An executor whose calls to the worker are counted."""

    def __init__(self, output) -> None:
        self.output, self.worker_calls = output, []
        self.sample_tokens = unit._make_executor_sample_tokens(lambda executor, grammar: executor.output)
        self.take_draft_token_ids = unit._make_take_draft_token_ids(
            lambda executor: executor.worker_calls.append("take_draft_token_ids") or "drafts from the worker")

    def step(self):
        """What EngineCore.step then post_step ask of the executor."""
        return self.sample_tokens(self, None), self.take_draft_token_ids(self)


def test_drafts_come_back_with_the_sampled_tokens_and_are_handed_out_once():
    drafts = DraftTokenIds(["a", "b"], [[5, 6, 7], [8, 9, 10]])
    output = step_output()
    worker_sample_tokens = unit._make_worker_sample_tokens(lambda worker, grammar: output)
    assert worker_sample_tokens(worker_with_drafts(drafts), None) is output
    assert getattr(output, unit.OUTPUT_ATTRIBUTE) is drafts

    executor = ExecutorStandIn(output)
    assert executor.step() == (output, drafts)
    assert executor.worker_calls == []  # no third call to the worker
    # Handed out once: a second take (nothing sampled since) asks the worker, as vLLM does.
    assert executor.take_draft_token_ids(executor) == "drafts from the worker"
    assert executor.worker_calls == ["take_draft_token_ids"]


def test_a_step_without_drafts_hands_out_none_without_a_call():
    output = step_output()
    unit._make_worker_sample_tokens(lambda worker, grammar: output)(worker_with_drafts(None), None)
    executor = ExecutorStandIn(output)
    assert executor.step() == (output, None) and executor.worker_calls == []


def test_nothing_is_attached_where_vllm_takes_drafts_otherwise():
    drafts = DraftTokenIds(["a"], [[1]])
    for worker, output in [(worker_with_drafts(drafts, use_async_scheduling=True), step_output()),
                           (worker_with_drafts(drafts, num_spec_tokens=0), step_output()),
                           (worker_with_drafts(drafts), EMPTY_MODEL_RUNNER_OUTPUT)]:
        assert unit._make_worker_sample_tokens(lambda w, g, output=output: output)(worker, None) is output
        assert not hasattr(output, unit.OUTPUT_ATTRIBUTE)
        executor = ExecutorStandIn(output)
        assert executor.step() == (output, "drafts from the worker")
        assert executor.worker_calls == ["take_draft_token_ids"]


def test_drafts_never_outlive_their_step():
    """A step whose output carries no drafts (another kind of output, or a future) forgets the
    previous step's: the engine then asks the worker."""
    drafts = DraftTokenIds(["a"], [[1]])
    first = step_output()
    setattr(first, unit.OUTPUT_ATTRIBUTE, drafts)
    executor = ExecutorStandIn(first)
    executor.sample_tokens(executor, None)
    executor.output = step_output()  # nothing attached
    assert executor.step() == (executor.output, "drafts from the worker")

"""Load-adaptive speculation (default on for ViSpec): the start-up table is the cost model's for
this target on this platform, draft tokens per step follow it as more requests run, the
scheduler re-derives it from the acceptance it measures, outputs stay unchanged, and an
environment switch turns it off.

On this CPU the cost model keeps drafting at every batch size (per-step overhead dominates), so
the tests give the engine a hardware profile on which processing a token is dear: then the table
shrinks K with the batch, as it does for a 7B target on a GPU.
"""

from __future__ import annotations

import pytest
from conftest import chat_tokens, engine_metrics, make_llm, mixed_conversations, shutdown_llm

from vispec_vllm import speculation_schedule
from vispec_vllm.cost_model import AcceptanceCurve, Hardware

pytestmark = pytest.mark.engine

K = 3
MANY = mixed_conversations() * 8  # 40 requests at once
# Fixed here (not this machine's fitted profile, which moves with each benchmark refit).
COSTLY_TOKENS = Hardware("test profile: costly tokens", memory_bandwidth=20e9, matmul_flops=100e9,
                         bandwidth_efficiency=1.0, compute_efficiency=1.0, layer_overhead_s=0.0,
                         step_overhead_s=3.7e-3, draft_forward_overhead_s=1.3e-3, per_token_overhead_s=0.2e-3,
                         per_request_overhead_s=0.3e-3, bytes_per_param=4)
ASSUMED_RATE = "0.9"


def drafted(llm, conversations) -> tuple[float, float, float, list[list[int]]]:
    before = engine_metrics(llm)
    outputs = chat_tokens(llm, conversations)
    after = engine_metrics(llm)
    delta = {name: after[name] - before[name] for name in (
        "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")}
    return (delta["vllm:spec_decode_num_drafts"], delta["vllm:spec_decode_num_draft_tokens"],
            delta["vllm:spec_decode_num_accepted_tokens"], outputs)


def k_for(schedule, batch: int) -> int:
    return next(k for first, last, k in schedule if first <= batch <= last)


def test_a_fault_in_the_feedback_keeps_the_engine_running():
    from types import SimpleNamespace

    from vispec_vllm.patches import acceptance_feedback
    from vllm.v1.core.sched.scheduler import Scheduler

    acceptance_feedback.apply()

    class BrokenSchedule:
        def record(self, num_draft_tokens, num_accepted_tokens):
            raise RuntimeError("broken")

    scheduler = SimpleNamespace(vispec_adaptive_schedule=BrokenSchedule(), log_stats=False, num_spec_tokens=K)
    assert Scheduler.make_spec_decoding_stats(scheduler, None, K, 1, None, "request-0") is None
    assert scheduler.vispec_adaptive_schedule is None  # feedback off, the step goes on


@pytest.fixture(scope="module")
def baseline(tiny_models) -> list[list[int]]:
    llm = make_llm(tiny_models / "tiny-llava", max_num_seqs=40)
    outputs = chat_tokens(llm, MANY)
    shutdown_llm(llm)
    return outputs


@pytest.fixture
def costly_tokens(monkeypatch):
    # In-process engine: the patches and the scheduler read these in this very process.
    monkeypatch.setattr(speculation_schedule, "platform_hardware", lambda: COSTLY_TOKENS)
    monkeypatch.setenv(speculation_schedule.ACCEPTANCE_RATE_ENV, ASSUMED_RATE)


def vispec_llm(tiny_models):
    return make_llm(tiny_models / "tiny-llava", max_num_seqs=40, disable_log_stats=False,
                    speculative_config={"model": str(tiny_models / "tiny-llava-vispec"), "num_speculative_tokens": K})


def installed_schedule(llm):
    return llm.llm_engine.vllm_config.speculative_config.num_speculative_tokens_per_batch_size


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def test_draft_tokens_follow_the_derived_schedule(tiny_models, baseline, costly_tokens, monkeypatch):
    monkeypatch.setattr(speculation_schedule, "REDERIVE_EVERY", 10**9)  # the start-up table only
    monkeypatch.setattr(speculation_schedule, "FIRST_PROBE_INTERVAL", 10**9)  # and no K tried beside it
    # Nor the step-time learner's choice: on a busy machine its fit can prefer another K than the table.
    monkeypatch.setattr(speculation_schedule, "MIN_STEADY_SAMPLES", 10**9)
    llm = vispec_llm(tiny_models)
    try:
        schedule = installed_schedule(llm)
        text_config = llm.llm_engine.vllm_config.model_config.hf_config.get_text_config()
        expected = speculation_schedule.AdaptiveSchedule.for_target(K, text_config, 1024, 40).derive(
            AcceptanceCurve.geometric(float(ASSUMED_RATE), max_k=K))
        assert [tuple(entry) for entry in schedule] == expected
        assert (k_for(expected, 1), k_for(expected, 12), k_for(expected, 40)) == (3, 1, 0)  # the premise

        _, tokens, _, outputs = drafted(llm, MANY)  # 40 running: no drafting
        assert tokens == 0
        assert outputs == baseline
        steps, tokens, _, _ = drafted(llm, MANY[:12])
        assert steps > 0 and tokens == steps * k_for(expected, 12)
        steps, tokens, _, outputs = drafted(llm, MANY[:1])  # alone
        assert steps > 0 and tokens == steps * k_for(expected, 1)
        assert outputs == baseline[:1]
    finally:
        shutdown_llm(llm)


def test_measured_acceptance_reshapes_the_schedule(tiny_models, baseline, costly_tokens, monkeypatch):
    monkeypatch.setattr(speculation_schedule, "MIN_REDERIVE_INTERVAL_S", 0.0)
    monkeypatch.setattr(speculation_schedule, "FIRST_PROBE_INTERVAL", 10**9)  # the table's K at every step,
    # not the step-time learner's: once the table changes K, a bucket has timed two K's, and on a busy
    # machine the fit of their step times can prefer another K (tests/unit/test_online_schedule.py
    # tests the learner).
    monkeypatch.setattr(speculation_schedule, "MIN_STEADY_SAMPLES", 10**9)
    llm = vispec_llm(tiny_models)
    try:
        adaptive = scheduler_of(llm).vispec_adaptive_schedule
        assert adaptive is not None and adaptive.max_batch == 40
        start_schedule = list(adaptive.schedule or adaptive.initial())
        drafts = accepted = draft_tokens = 0
        for _ in range(4):
            steps, tokens, accepted_tokens, outputs = drafted(llm, MANY[:8])
            assert outputs == baseline[:8]
            drafts, draft_tokens, accepted = drafts + steps, draft_tokens + tokens, accepted + accepted_tokens
        assert drafts >= speculation_schedule.REDERIVE_EVERY
        # The scheduler counted exactly what vLLM's own counters saw, position by position (the
        # engine is fresh: its counters hold these runs only), and measures acceptance from them.
        metrics = {metric.name: metric for metric in llm.get_metrics()}
        accepted_per_position = list(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values)
        assert sum(accepted_per_position) == accepted
        assert sum(adaptive.drafted) == draft_tokens and adaptive.drafted[0] == drafts
        assert adaptive.accepted == accepted_per_position
        measured = adaptive.measured_acceptance()
        assert measured(1) == pytest.approx(1 + accepted_per_position[0] / drafts)
        # The table is re-derived from a measured curve, no longer the start-up one: the random
        # tiny draft is accepted far less than the assumed 0.9.
        assert adaptive.derived_from(1) < 1 + float(ASSUMED_RATE)
        assert adaptive.schedule == adaptive.derive(adaptive.derived_from)
        assert adaptive.schedule != start_schedule
        # vLLM's lookup holds at every entry the K the last step drafted: the table's at the batch
        # size it ran (the step-time learner is held off), whatever the step scheduled.
        lookup = scheduler_of(llm).dynamic_sd_lookup
        table = [0] + [k_for(adaptive.schedule, batch) for batch in range(1, 41)]
        assert any(lookup == [0] + [table[batch]] * 40 for batch in range(1, 9))
        # Steady decode steps were timed, at the batch size that ran (for the step-time learner).
        assert {bucket for bucket, _ in adaptive.online.times.samples} == {8}
    finally:
        shutdown_llm(llm)


def test_adaptive_speculation_can_be_turned_off(tiny_models, baseline, costly_tokens, monkeypatch):
    monkeypatch.setenv("VISPEC_VLLM_ADAPTIVE", "0")
    llm = vispec_llm(tiny_models)
    try:
        assert installed_schedule(llm) is None and scheduler_of(llm).vispec_adaptive_schedule is None
        steps, tokens, _, outputs = drafted(llm, MANY)
        assert steps > 0 and tokens == steps * K
        assert outputs == baseline
    finally:
        shutdown_llm(llm)

"""How the load-adaptive schedule hands each step's K to vLLM's scheduler
(vispec_vllm/patches/acceptance_feedback.py, the `schedule` wrapper): vLLM looks the K up in its
dense batch-size -> K table at the number of requests the step ends up scheduling, so the K the
schedule picks at the running batch size must be the one drafted whether or not requests join."""

from __future__ import annotations

from types import SimpleNamespace

from vispec_vllm.patches.acceptance_feedback import _make_schedule

TABLE_K = 3  # what the re-derived table holds at every batch size (the deep demo pair's)
MAX_NUM_SEQS = 8


class ScheduleThatPicks:
    """Stands in for AdaptiveSchedule: K = 5 at one or two running requests, 4 beyond."""

    schedule = [(1, 2, 2), (3, 1_000_000, 1)]  # the cost model's table as last derived

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.online = SimpleNamespace(step_scheduled=lambda step: None, summary=lambda: "")

    def step_k(self, batch: int) -> int:
        self.asked.append(batch)
        return 5 if batch <= 2 else 4


class ScheduleThatFails(ScheduleThatPicks):
    def step_k(self, batch: int) -> int:
        raise ZeroDivisionError("a fault in the step-time feedback")


def vllm_schedule(scheduler):
    """What vLLM's `Scheduler.schedule` does with the table: it schedules every running request,
    admits waiting ones up to max_num_seqs, and reads K at the number it scheduled."""
    admitted = scheduler.waiting[:MAX_NUM_SEQS - len(scheduler.running)]
    scheduler.running, scheduler.waiting = scheduler.running + admitted, scheduler.waiting[len(admitted):]
    scheduled = {request: 1 for request in scheduler.running}
    return SimpleNamespace(num_scheduled_tokens=scheduled, scheduled_new_reqs=[], scheduled_spec_decode_tokens={},
                           num_spec_tokens_to_schedule=scheduler.dynamic_sd_lookup[len(scheduled)])


def scheduler(running: int, waiting: int) -> SimpleNamespace:
    return SimpleNamespace(running=[f"running-{i}" for i in range(running)],
                           waiting=[f"waiting-{i}" for i in range(waiting)],
                           dynamic_sd_lookup=[0] + [TABLE_K] * MAX_NUM_SEQS,
                           vispec_adaptive_schedule=ScheduleThatPicks(), vispec_schedule_logged_at=0.0,
                           num_spec_tokens=5)


schedule = _make_schedule(vllm_schedule)


def test_a_step_that_admits_a_request_drafts_the_k_picked_for_the_running_batch():
    state = scheduler(running=2, waiting=1)  # 3 scheduled: the table's entry there says 3
    assert schedule(state).num_spec_tokens_to_schedule == 5
    assert state.vispec_adaptive_schedule.asked == [2]
    state = scheduler(running=4, waiting=2)
    assert schedule(state).num_spec_tokens_to_schedule == 4


def test_an_idle_engine_picks_k_for_the_requests_waiting():
    state = scheduler(running=0, waiting=2)
    assert schedule(state).num_spec_tokens_to_schedule == 5
    assert state.vispec_adaptive_schedule.asked == [2]
    state = scheduler(running=0, waiting=20)  # at most the table's largest batch size
    schedule(state)
    assert state.vispec_adaptive_schedule.asked == [MAX_NUM_SEQS]


def test_nothing_to_schedule_leaves_the_table_alone():
    state = scheduler(running=0, waiting=0)
    schedule(state)
    assert state.vispec_adaptive_schedule.asked == [] and state.dynamic_sd_lookup == [0] + [TABLE_K] * MAX_NUM_SEQS


def test_without_a_schedule_the_table_decides():
    state = scheduler(running=2, waiting=1)
    state.vispec_adaptive_schedule = None
    assert schedule(state).num_spec_tokens_to_schedule == TABLE_K


def test_a_fault_in_the_step_time_feedback_falls_back_to_the_table():
    """The schedule is an optimisation: a fault in it costs no request. The table as last derived
    goes into vLLM's lookup and decides from then on."""
    state = scheduler(running=2, waiting=1)
    state.vispec_adaptive_schedule = ScheduleThatFails()
    assert schedule(state).num_spec_tokens_to_schedule == 1  # 3 scheduled: the table's K there
    assert state.vispec_adaptive_schedule is None
    assert state.dynamic_sd_lookup == [0, 2, 2] + [1] * (MAX_NUM_SEQS - 2)
    state.running = state.running[:2]
    assert schedule(state).num_spec_tokens_to_schedule == 2

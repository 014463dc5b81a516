"""Patch: keep the load-adaptive schedule in step with the draft's measured acceptance and with
the measured step times.

vLLM functions: `vllm.v1.core.sched.scheduler.Scheduler.__init__`,
`Scheduler.make_spec_decoding_stats` and `Scheduler.schedule` (vLLM 0.32.0), in the engine-core
process. Why: the schedule installed at start-up (patches/speculative_config.py) rests on an
assumed acceptance rate and on the cost model's step times. The scheduler sees every verified
draft (make_spec_decoding_stats is called once per request with drafts, whether or not stats are
logged): this wrapper feeds each one to the scheduler's `vispec_adaptive_schedule`
(vispec_vllm/speculation_schedule.py), which now and then re-derives its cost-model table from
the measured acceptance curve. And it times every step
(the interval between two `schedule` calls): before each step, every entry of the lookup is set to
the K that the measured step times favour at the running batch size (`AdaptiveSchedule.step_k`).
Every entry, because vLLM looks the step's K up at the number of requests the step ends up
scheduling, which differs from the running batch when requests join it: with only the running
batch's entry set, a step that admitted a request drafted the K left in the next entry, the table's
(K=3 on the deep demo pair, where the schedule drafts 5), and after each re-derivation of the table
every entry but the running batch's held it again.
Should the step-time feedback fail, the table as last derived is installed in the lookup and
drafts every step from then on.
On CUDA, vLLM sized its graph captures from the start-up table; a batch whose new K has no
captured size runs that step without a graph.
Guard: only schedulers whose draft config says `ViSpecDraftConfig.adaptive_schedule` (set by the
speculative-config patch when it installed its own table; a user's table is left alone).
"""

from __future__ import annotations

import logging
import os
import time

from vispec_vllm.patches._wrap import wrap

logger = logging.getLogger("vllm.vispec_vllm")
# How often the engine logs the online schedule (the same interval as the proposer's state line).
SCHEDULE_LOG_INTERVAL_S = float(os.environ.get("VISPEC_VLLM_STATE_LOG_INTERVAL_S", "60"))


def _make_init(original_init):
    from vispec_vllm.checkpoint_format import ViSpecDraftConfig
    from vispec_vllm.speculation_schedule import AdaptiveSchedule

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        original_init(self, vllm_config, *args, **kwargs)
        self.vispec_adaptive_schedule = None
        self.vispec_schedule_logged_at = time.perf_counter()  # when the online schedule was last logged
        spec = vllm_config.speculative_config
        draft = spec.draft_model_config if spec is not None else None
        vispec = ViSpecDraftConfig.stored_in(draft.hf_config) if draft is not None else None
        if self.dynamic_sd_lookup is not None and vispec is not None and vispec.adaptive_schedule:
            target = vllm_config.model_config
            self.vispec_adaptive_schedule = AdaptiveSchedule.for_target(
                self.num_spec_tokens, target.hf_config.get_text_config(), target.max_model_len,
                self.scheduler_config.max_num_seqs)

    return __init__


def _make_make_spec_decoding_stats(original_make_spec_decoding_stats):
    from vispec_vllm.speculation_schedule import describe

    def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                 num_invalid_spec_tokens, request_id):
        adaptive = getattr(self, "vispec_adaptive_schedule", None)
        if adaptive is not None and num_draft_tokens:
            try:
                table_before = adaptive.schedule
                schedule = adaptive.record(num_draft_tokens, num_accepted_tokens)
            except Exception:
                # The schedule is an optimisation: a fault in it must not take the engine down.
                logger.exception("vispec-vllm: acceptance feedback failed; keeping the current schedule")
                self.vispec_adaptive_schedule = schedule = None
            # The next `schedule` call reads the re-derived table (through AdaptiveSchedule.step_k).
            if schedule is not None and schedule != table_before:
                acceptance = adaptive.derived_from
                logger.info("vispec-vllm: measured mean acceptance length %s; draft tokens per running batch "
                            "size now %s", ", ".join(f"K={k}: {acceptance(k):.2f}"
                                                     for k in acceptance.mean_acceptance_length_by_k),
                            describe(schedule))
        return original_make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                                 num_invalid_spec_tokens, request_id)

    return make_spec_decoding_stats


def _decode_only(scheduler_output) -> bool:
    """Every scheduled request runs exactly its pending verified tokens: no prefill, no new request."""
    spec_tokens, scheduled = scheduler_output.scheduled_spec_decode_tokens, scheduler_output.num_scheduled_tokens
    return not scheduler_output.scheduled_new_reqs and all(
        count == 1 + len(spec_tokens.get(req_id, ())) for req_id, count in scheduled.items())


def _make_schedule(original_schedule):
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    from vispec_vllm.speculation_schedule import ScheduledStep

    def schedule(self, *args, **kwargs):
        adaptive = getattr(self, "vispec_adaptive_schedule", None)
        if adaptive is None:
            return original_schedule(self, *args, **kwargs)
        started = time.perf_counter()
        try:
            lookup = self.dynamic_sd_lookup
            # An idle engine's step schedules requests that are waiting, up to the lookup's bound.
            batch = min(len(self.running) or len(self.waiting), len(lookup) - 1)
            if batch > 0:
                lookup[1:] = [adaptive.step_k(batch)] * (len(lookup) - 1)
        except Exception:
            # Fall back to the cost model's table, as last derived, for the rest of the engine's life.
            logger.exception("vispec-vllm: step-time feedback failed; drafting by the cost model's table from now on")
            if adaptive.schedule:
                self.dynamic_sd_lookup = build_dynamic_sd_schedule_lookup(
                    adaptive.schedule, len(self.dynamic_sd_lookup) - 1, self.num_spec_tokens)
            self.vispec_adaptive_schedule = adaptive = None
        output = original_schedule(self, *args, **kwargs)
        if adaptive is not None and output.num_scheduled_tokens:
            adaptive.online.step_scheduled(ScheduledStep(
                started, len(output.num_scheduled_tokens), output.num_spec_tokens_to_schedule,
                frozenset(output.num_scheduled_tokens), _decode_only(output)))
            if started - self.vispec_schedule_logged_at >= SCHEDULE_LOG_INTERVAL_S:
                self.vispec_schedule_logged_at = started
                logger.info("vispec-vllm: online schedule: %s", adaptive.online.summary())
        return output

    return schedule


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    wrap(Scheduler, "__init__", _make_init)
    wrap(Scheduler, "make_spec_decoding_stats", _make_make_spec_decoding_stats)
    wrap(Scheduler, "schedule", _make_schedule)

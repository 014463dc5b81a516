"""Patch: the ViSpec proposer's image-state misses as `vispec:image_state_misses_total` on /metrics.

A miss: a step needed an image's compressed state (its global feature or compressed tokens) after
it had left the proposer's LRU state (vispec_vllm/proposer.py) while a prefix-cache hit skipped
the encoder, so the request drafts without that image for good (outputs stay the target's). The
count starts in the worker and reaches the API server's Prometheus registry on vLLM's own
per-step objects (vLLM 0.32.0):

- worker: `vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens` (inherited by the CPU
  runner; the proposer drafts inside it) puts the proposer's misses since the last step on the
  step's `ModelRunnerOutput` as the attribute `vispec_image_state_misses` (under the multiprocess
  executor that object is pickled whole to the engine core, attribute included). Wrapped on the
  runner's class by patches/eagle_proposer.py when it builds a ViSpecProposer, so only a ViSpec
  worker pays for it;
- engine core: `vllm.v1.core.sched.scheduler.Scheduler.update_from_output` adds them up, and
  `Scheduler.make_stats` moves the sum into the step's `SchedulerStats`;
- `vllm.v1.metrics.stats.SchedulerStats` gains the dataclass field `vispec_image_state_misses`
  (int, default 0, not an `__init__` argument): vLLM sends SchedulerStats to the API server with
  msgspec, field by field, so a plain attribute would be dropped on the way;
- API server: `vllm.v1.metrics.loggers.PrometheusStatLogger.record` adds it to the counter.
Why: a miss is otherwise visible only as lower acceptance and one warning per process.
Guard: the runner wrapper exists only beside a ViSpecProposer; without one the other wrappers
move a count that stays 0. Counts reach /metrics only with stats logging on
(vLLM's default for `vllm serve`; `LLM(disable_log_stats=False)` offline).
"""

from __future__ import annotations

import dataclasses

from vispec_vllm.patches._wrap import wrap

MISSES_FIELD = "vispec_image_state_misses"
COUNTER_NAME = "vispec:image_state_misses"  # exposed as vispec:image_state_misses_total
_counter = None


def image_state_misses_counter():
    """The process's counter (created on first use: the API server's, or the caller's for `LLM`)."""
    global _counter
    if _counter is None:
        from prometheus_client import Counter

        _counter = Counter(COUNTER_NAME, "Times a ViSpec draft step needed an image's state that was no longer "
                                         "cached (evicted while a prefix-cache hit skipped the encoder).")
    return _counter


def _add_scheduler_stats_field() -> None:
    from vllm.v1.metrics.stats import SchedulerStats

    if MISSES_FIELD in SchedulerStats.__dataclass_fields__:
        return
    # A fully formed dataclass Field, taken from a throwaway dataclass.
    template = dataclasses.make_dataclass("_Template", [(MISSES_FIELD, int, dataclasses.field(default=0, init=False))])
    SchedulerStats.__dataclass_fields__[MISSES_FIELD] = template.__dataclass_fields__[MISSES_FIELD]
    SchedulerStats.__annotations__[MISSES_FIELD] = int
    setattr(SchedulerStats, MISSES_FIELD, 0)


def _make_sample_tokens(original_sample_tokens):
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    def sample_tokens(self, *args, **kwargs):
        output = original_sample_tokens(self, *args, **kwargs)
        take_misses = getattr(getattr(self, "drafter", None), "take_new_image_state_misses", None)
        # An async-scheduling output wraps the ModelRunnerOutput it will hand back.
        step_output = getattr(output, "_model_runner_output", output)
        if (take_misses is not None and isinstance(step_output, ModelRunnerOutput)
                and step_output is not EMPTY_MODEL_RUNNER_OUTPUT):
            misses = take_misses()
            if misses:
                setattr(step_output, MISSES_FIELD, misses)
        return output

    return sample_tokens


def _make_update_from_output(original_update_from_output):
    def update_from_output(self, scheduler_output, model_runner_output):
        misses = getattr(model_runner_output, MISSES_FIELD, 0)
        if misses:
            self.vispec_image_state_misses = getattr(self, "vispec_image_state_misses", 0) + misses
        return original_update_from_output(self, scheduler_output, model_runner_output)

    return update_from_output


def _make_make_stats(original_make_stats):
    def make_stats(self, *args, **kwargs):
        stats = original_make_stats(self, *args, **kwargs)
        misses = getattr(self, "vispec_image_state_misses", 0)
        if stats is not None and misses:
            setattr(stats, MISSES_FIELD, misses)
            self.vispec_image_state_misses = 0
        return stats

    return make_stats


def _make_record(original_record):
    def record(self, scheduler_stats, *args, **kwargs):
        counter = image_state_misses_counter()  # on /metrics (at 0) from the first record on
        if scheduler_stats is not None:
            misses = getattr(scheduler_stats, MISSES_FIELD, 0)
            if misses:
                counter.inc(misses)
        return original_record(self, scheduler_stats, *args, **kwargs)

    return record


def apply() -> None:
    """The engine-core and API-server parts (every process the plugin loads in)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    _add_scheduler_stats_field()
    wrap(Scheduler, "update_from_output", _make_update_from_output)
    wrap(Scheduler, "make_stats", _make_make_stats)
    wrap(PrometheusStatLogger, "record", _make_record)


def apply_to_model_runner(runner_class: type) -> None:
    """The worker part, applied by patches/eagle_proposer.py to the class of the runner a
    ViSpecProposer drafts for."""
    wrap(runner_class, "sample_tokens", _make_sample_tokens)

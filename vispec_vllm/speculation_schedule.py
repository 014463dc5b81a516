"""Load-adaptive speculation for ViSpec drafts: how many draft tokens to propose at each number of
running requests (vLLM 0.32's dynamic-SD table, `num_speculative_tokens_per_batch_size`).

The table is the cost model's (vispec_vllm/cost_model.py): at each batch size, the K that
maximises predicted tokens/s for this target on this platform. It needs the draft's acceptance.
At start-up that is an assumed per-position rate (VISPEC_VLLM_ACCEPTANCE_RATE, default 0.75); once
the engine runs, the scheduler feeds every verified draft into `AdaptiveSchedule.record`
(patches/acceptance_feedback.py) and the table is re-derived from the measured acceptance curve:
after the first REDERIVE_EVERY drafts, then whenever the curve has moved (checked every
REDERIVE_EVERY drafts, at most once per MIN_REDERIVE_INTERVAL_S). The table keeps K at least 1
for a request running alone, so acceptance keeps being measured after traffic on which the draft
was useless. The K a step actually drafts comes from measured step times (`OnlineSchedule`,
below), which start from this table.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vispec_vllm.cost_model import (
    H100,
    H200,
    THIS_CPU,
    AcceptanceCurve,
    Hardware,
    LanguageModelShape,
    derive_schedule,
    step_time,
)

ADAPTIVE_ENV = "VISPEC_VLLM_ADAPTIVE"
ACCEPTANCE_RATE_ENV = "VISPEC_VLLM_ACCEPTANCE_RATE"
# Below what published ViSpec drafts reach on their benchmarks, above what a text-style draft
# reaches on image prompts; the measured curve replaces it after REDERIVE_EVERY drafts.
DEFAULT_ACCEPTANCE_RATE = 0.75
REDERIVE_EVERY = 64
# A derivation walks every batch size up to max_num_seqs (tens of ms for 1,024), on the
# scheduler's path: after the first, at most one per interval, and only for a curve that moved.
MIN_REDERIVE_INTERVAL_S = 10.0
CURVE_TOLERANCE = 0.05  # in mean acceptance length, at any K
# Counts are halved past this many drafts, so the table follows changes in traffic.
MEMORY_DRAFTS = 4096

Schedule = list[tuple[int, int, int]]


def adaptive_enabled() -> bool:
    return os.environ.get(ADAPTIVE_ENV, "1") != "0"


def assumed_acceptance_rate() -> float:
    rate = float(os.environ.get(ACCEPTANCE_RATE_ENV, DEFAULT_ACCEPTANCE_RATE))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{ACCEPTANCE_RATE_ENV} must be in [0, 1), got {rate}")
    return rate


def platform_hardware() -> Hardware:
    """The cost model's profile for the platform vLLM runs on (H100-class for an unknown GPU)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return THIS_CPU
    try:
        name = current_platform.get_device_name(0)  # NVML on CUDA: no CUDA context in this process
    except Exception:  # noqa: BLE001 - a profile is a best guess either way
        name = ""
    return H200 if "H200" in name else H100


def describe(schedule: Schedule) -> str:
    return ", ".join(f"{first}-{last if last < 1_000_000 else ''}: {k}" for first, last, k in schedule)


@dataclass
class AdaptiveSchedule:
    """The schedule of one engine and the acceptance it has measured (lives on the scheduler)."""

    hardware: Hardware
    target: LanguageModelShape
    max_k: int
    context: int
    max_batch: int = 1024  # the engine's max_num_seqs: vLLM looks K up for no larger batch
    # drafted[j] / accepted[j]: verified drafts that had a token at position j / accepted it.
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    drafts_since_derivation: int = 0
    derived_at: float | None = None  # when the first measured curve was adopted
    # The table in force and the acceptance curve it was derived from.
    schedule: Schedule = field(default_factory=list)
    derived_from: AcceptanceCurve | None = None
    # K per step from measured step times (the table above is its starting point).
    online: OnlineSchedule | None = None

    def __post_init__(self) -> None:
        self.drafted = self.drafted or [0] * self.max_k
        self.accepted = self.accepted or [0] * self.max_k
        if self.online is None:
            self.online = OnlineSchedule(self.max_k, self.predicted_step_seconds)

    def predicted_step_seconds(self, batch: int, k: int) -> float:
        return step_time(self.hardware, self.target, batch, k, self.context)

    def step_k(self, batch: int) -> int:
        """K for the step about to be scheduled at this batch size: the table's until steps at this
        batch size have been timed, then what the measured step times favour (see OnlineSchedule)."""
        if self.derived_from is None:
            self.initial()
        table_k = next(k for first, last, k in self.schedule if first <= batch <= last)
        return self.online.step_k(batch, self.derived_from, default_k=table_k)

    @classmethod
    def for_target(cls, max_k: int, target_text_config, max_model_len: int, max_num_seqs: int = 1024,
                   hardware: Hardware | None = None) -> AdaptiveSchedule:
        """At a context of half the model length (at most 2,048 tokens)."""
        return cls(hardware or platform_hardware(), LanguageModelShape.from_hf_text_config(target_text_config),
                   max_k, context=min(max_model_len, 4096) // 2, max_batch=max_num_seqs)

    def derive(self, acceptance: AcceptanceCurve) -> Schedule:
        schedule = derive_schedule(self.hardware, self.target, self.max_k, acceptance, self.context, self.max_batch)
        first, last, k = schedule[0]
        if k == 0:  # keep measuring: a request running alone always drafts
            schedule = [(1, 1, 1)] + ([(2, last, 0)] if last > 1 else []) + schedule[1:]
        return schedule

    def _adopt(self, acceptance: AcceptanceCurve) -> Schedule:
        self.schedule, self.derived_from = self.derive(acceptance), acceptance
        return self.schedule

    def initial_acceptance(self) -> AcceptanceCurve:
        return AcceptanceCurve.geometric(assumed_acceptance_rate(), max_k=self.max_k)

    def initial(self) -> Schedule:
        return self._adopt(self.initial_acceptance())

    def measured_acceptance(self) -> AcceptanceCurve | None:
        """Mean acceptance length at K = 1..n, n the deepest position drafted REDERIVE_EVERY times."""
        lengths, length = {}, 1.0
        for position in range(self.max_k):
            if self.drafted[position] < REDERIVE_EVERY:
                break
            length += self.accepted[position] / self.drafted[position]
            lengths[position + 1] = length
        return AcceptanceCurve(lengths) if lengths else None

    def record(self, num_draft_tokens: int, num_accepted_tokens: int) -> Schedule | None:
        """One verified draft; returns a re-derived schedule when one is due."""
        for position in range(min(num_draft_tokens, self.max_k)):
            self.drafted[position] += 1
            self.accepted[position] += position < num_accepted_tokens
        self.drafts_since_derivation += 1
        if self.drafts_since_derivation < REDERIVE_EVERY or (
                self.derived_at is not None and time.monotonic() - self.derived_at < MIN_REDERIVE_INTERVAL_S):
            return None
        self.drafts_since_derivation = 0
        acceptance = self.measured_acceptance()
        if self.drafted[0] > MEMORY_DRAFTS:
            self.drafted = [n // 2 for n in self.drafted]
            self.accepted = [n // 2 for n in self.accepted]
        if acceptance is None or (self.derived_at is not None and self._close_to_current(acceptance)):
            return None
        self.derived_at = time.monotonic()
        return self._adopt(acceptance)

    def _close_to_current(self, acceptance: AcceptanceCurve) -> bool:
        return all(abs(acceptance(k) - self.derived_from(k)) <= CURVE_TOLERANCE for k in range(1, self.max_k + 1))


# --------------------------------------------------------------------------------------------
# Learning the schedule from measured step times while serving
#
# The cost model's overheads are fitted on one machine and one pair; elsewhere (another CPU, a
# deeper target, a compiled draft) its predicted step times can be off by more than the margin
# between two choices of K. So the scheduler also times its own steps. For each batch-size bucket
# it keeps the mean seconds of steady decode steps at each K (pauses left out), and fits them with
#     step seconds(K) = base + [K > 0] * drafting + K * per_draft_token
# (least squares weighted by sample counts, so a K tried for a few steps borrows strength from the
# K's measured often), then picks the K with the most tokens per second, tau(K) / step seconds(K),
# tau being the measured mean acceptance length. Until a bucket has measured two K's, the engine
# keeps the K of the nearest bucket that has, or while none has the start-up table's K (the cost
# model's; without a table, its prediction scaled by the bucket's measured error decides). Now and
# then another K (K = 0, no speculation, too) is tried for a few steps, so that every estimate
# stays current; the interval between such probes doubles while they confirm the choice.
# A probe costs what its K loses against the K in force, so a measured K that the fit puts far
# behind is probed seldom: at most PROBE_STEPS steps per PROBE_STEPS * regret / PROBE_LOSS_BUDGET
# steps of its bucket (regret: the share of tokens/s it loses), which caps what probing it costs
# at PROBE_LOSS_BUDGET. In the deep demo pair's server at concurrency 4, K = 0 ran at under half
# K = 5's tokens/s, and probing it every 64-512 steps took 19 of 961 steps (about 1% of tokens/s).
# The K's are timed at different times (the K in force every step, the others in probes), so
# their means are kept relative to the K in force, whose steps gauge the machine's speed (see
# MeasuredStepTimes): a slow spell of the whole machine changes no K's standing.
# A bucket past 4 spans several batch sizes (9-16), and a step at 9 requests costs much less than
# one at 16: an 8-step probe lands on whatever batch the traffic has then, the K in force's mean
# spans them all. So each step time is scaled to the bucket's largest batch by the cost model's
# ratio predicted(largest, K) / predicted(batch, K) before it is kept (the ratio only corrects the
# batch's share; the K's are still compared by measurement). In simulated waves of 9-16 requests,
# unscaled probes left the schedule at 0.97x of the best fixed K (0.88x in the worst of 12 runs),
# scaled ones at 0.996x.

MIN_STEADY_SAMPLES = 4  # steady steps at (bucket, K) before that K counts as measured
STEP_TIME_WEIGHT = 0.02  # of a new step in a K's running mean, once past 1 / STEP_TIME_WEIGHT samples
# A K's mean counts in the fit for half as many steps per STALE_HALF_LIFE steady steps timed in its
# bucket since it was last timed: a K probed seldom (one far behind the K in force) fades from the
# fit between its probes instead of pulling it with a ratio measured under other conditions.
STALE_HALF_LIFE = 512
# When the gauge has moved by more than REPROBE_DRIFT since the last probe began, the next probe
# comes within REPROBE_AFTER steps (the gauge's running mean has caught up by then) and the probe
# interval starts again from FIRST_PROBE_INTERVAL.
REPROBE_DRIFT = 0.1
REPROBE_AFTER = 128
# A served engine now and then takes a few steps tens of times longer than the rest (in the demo's
# server: 9 steps that moved a 15 ms mean to 21 ms at once, and K with it, for hundreds of steps).
# A steady step over PAUSE_FACTOR times its K's mean is such a pause, not a step time, and is left
# out; a mean over PAUSE_FACTOR times a new step was raised by one and starts again from it. After
# MAX_PAUSES_IN_A_ROW such steps at one K the step time has changed, not paused: the mean starts
# again from the next.
PAUSE_FACTOR = 3.0
MAX_PAUSES_IN_A_ROW = 32
PROBE_STEPS = 8  # steps of one probe; its first is a transition (verifies the previous K's drafts)
FIRST_PROBE_INTERVAL = 64  # steps in a bucket between probes; doubles up to MAX_PROBE_INTERVAL
MAX_PROBE_INTERVAL = 512
PROBE_LOSS_BUDGET = 0.005  # share of tokens/s that probing one far-behind K may cost
MAX_REGRET_INTERVAL = 4 * MAX_PROBE_INTERVAL  # even the furthest-behind K is probed this often
SWITCH_MARGIN = 0.01  # a new K must promise this much more tokens/s than the K in force
REFIT_EVERY = 8  # new steady samples in a bucket before its K is chosen again
# A probe's step counts only if the gauge's steps within LOCAL_WINDOW_STEPS step durations (its own
# or the gauge's, the longer) before or after it (at least LOCAL_REFERENCES of them) ran within
# LOCAL_SPEED_TOLERANCE of the gauge's mean: see MeasuredStepTimes.
LOCAL_WINDOW_STEPS = 16
LOCAL_REFERENCES = 3
LOCAL_SPEED_TOLERANCE = 0.15
RECENT_GAUGE_STEPS = 64  # gauge steps kept per bucket for that comparison


def batch_bucket(batch: int) -> int:
    """Batch sizes 1-4 each their own bucket; then 5-8, 9-16, 17-32, ... (the bucket's last size)."""
    return batch if batch <= 4 else 1 << (batch - 1).bit_length()


def bucket_label(bucket: int) -> str:
    return str(bucket) if bucket <= 4 else f"{bucket // 2 + 1}-{bucket}"


def _least_squares(rows: list[list[float]], targets: list[float], weights: list[float]) -> list[float] | None:
    """Weighted least squares by the normal equations (at most 3 unknowns); None if singular."""
    n = len(rows[0])
    a = [[sum(w * r[i] * r[j] for r, w in zip(rows, weights, strict=True)) for j in range(n)] for i in range(n)]
    b = [sum(w * r[i] * t for r, t, w in zip(rows, targets, weights, strict=True)) for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, n), key=lambda i: abs(a[i][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, max(abs(x) for row in a for x in row)):
            return None
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for i in range(n):
            if i != col:
                f = a[i][col] / a[col][col]
                a[i] = [x - f * y for x, y in zip(a[i], a[col], strict=True)]
                b[i] -= f * b[col]
    return [b[i] / a[i][i] for i in range(n)]


@dataclass
class MeasuredStepTimes:
    """Mean seconds of steady steps per (batch bucket, K), and the fit over K that smooths them.

    The machine's speed drifts while it serves (other work on the host, a slow spell), and a K is
    timed only while it runs: the K in force every step, the others in probes minutes apart. Means
    taken at different speeds do not compare (in the deep demo pair's server a slow spell raised
    the batch-1 mean of the K in force from 27.8 to 37.1 ms, while the K's around it kept means
    from before it, and the fit moved to a worse K and stayed there). So each bucket's speed is
    gauged by one K, the K in force (`follow`): `gauge_seconds` is its running mean, and every
    other K keeps its step time *relative* to the gauge when it was timed. A uniform change of
    speed moves every K's estimate alike and changes no choice; a probe re-measures its K's ratio.

    A bucket past 4 spans several batch sizes, and its steps are scaled to the largest by the cost
    model's ratio, which is only as right as the model's cost per request. So a probe's step is
    compared with the gauge's mean at the probe's own batch size (`gauge_at_batch`), once the gauge
    has been timed there: the scaling then cancels out of the ratio, whatever batch the probe
    lands on. (In the deep demo pair's server at concurrency 16, probes compared with the bucket's
    mean put K = 3 at 0.64x K = 5's step time, where servers at fixed K = 3 and 5 had ITLs 0.83x
    apart, and the schedule drafted 4 tokens a step where K = 5 was as fast as any.)

    The gauge's mean follows the speed over tens of steps, not the speed of the moment: a probe
    timed in a short spell of another speed reads its K wrong by the spell's factor. In the deep demo
    pair's server, batch-1 steps in the tail of a loaded run (requests finishing, the server and the
    client busy with them) took 1.5x the batch-1 steps at concurrency 1; in a longer run of that
    server the schedule held K = 4 and 5 at 1.5-1.7x K = 3's batch-1 step time (1.1x between
    servers at fixed K) and drafted 3 tokens where 5 were fastest. So a probe's step
    waits until the gauge's steps around it are timed (`waiting`) and counts only if they ran at the
    gauge's usual speed (`_settle`); the probe's verdict on the choice waits for it too.
    """

    # Per (bucket, K): step seconds over the bucket's gauge seconds (1.0 for the gauging K).
    relative: dict[tuple[int, int], float] = field(default_factory=dict)
    samples: dict[tuple[int, int], int] = field(default_factory=dict)
    pauses_in_a_row: dict[tuple[int, int], int] = field(default_factory=dict)
    gauge_k: dict[int, int] = field(default_factory=dict)  # per bucket: the K whose steps gauge its speed
    gauge_seconds: dict[int, float] = field(default_factory=dict)  # per bucket: that K's running mean
    # Per (bucket, batch size): the gauging K's running mean there and its samples.
    gauge_at_batch: dict[tuple[int, int], tuple[float, int]] = field(default_factory=dict)
    follow_k: dict[int, int] = field(default_factory=dict)  # per bucket: the K to gauge with once timed
    timed_steps: dict[int, int] = field(default_factory=dict)  # per bucket: steady steps timed
    last_timed: dict[tuple[int, int], int] = field(default_factory=dict)  # per (bucket, K): timed_steps then
    # Per bucket: the gauge's last steps as (start time, batch, seconds), and probe steps waiting
    # for the gauge's steps after them, as (start time, batch, K, seconds, whether K's mean starts
    # again from it).
    recent_gauge: dict[int, deque[tuple[float, int, float]]] = field(default_factory=dict)
    waiting: dict[int, list[tuple[float, int, int, float, bool]]] = field(default_factory=dict)
    unreferenced_probe_steps: int = 0  # probe steps left out: timed in a spell of another speed

    def mean_seconds(self, bucket: int, k: int) -> float:
        """K's step seconds at the bucket's current speed."""
        return self.relative[(bucket, k)] * self.gauge_seconds[bucket]

    def freshness(self, bucket: int, k: int) -> float:
        """What K's samples still count for: half per STALE_HALF_LIFE steps timed in the bucket since
        K was last timed there (meaningless for a K never timed there, whose count is 0)."""
        age = self.timed_steps.get(bucket, 0) - self.last_timed.get((bucket, k), 0)
        return 0.5 ** (age / STALE_HALF_LIFE)

    def gauge(self, bucket: int) -> tuple[int, float] | None:
        """The K gauging the bucket's speed and its mean step seconds, once a step there is timed."""
        return (self.gauge_k[bucket], self.gauge_seconds[bucket]) if bucket in self.gauge_k else None

    def follow(self, batch: int, k: int) -> None:
        """Gauge the bucket's speed by K's steps from now on (from its first timed step if untimed)."""
        bucket = batch_bucket(batch)
        self.follow_k[bucket] = k
        if (bucket, k) in self.relative and self.gauge_k[bucket] != k:
            self._rebase(bucket, k)

    def _rebase(self, bucket: int, k: int) -> None:
        factor = self.relative[(bucket, k)]
        self.gauge_seconds[bucket] *= factor
        for key in self.relative:
            if key[0] == bucket:
                self.relative[key] /= factor
        for key, (seconds, count) in self.gauge_at_batch.items():
            if key[0] == bucket:
                self.gauge_at_batch[key] = (seconds * factor, count)
        self.gauge_k[bucket] = k
        # Waiting probe steps and the neighbours they wait for were timed against the old gauge.
        self.waiting.pop(bucket, None)
        self.recent_gauge.pop(bucket, None)

    def _gauge_seconds_at(self, bucket: int, batch: int) -> float:
        """What a gauge step takes at this batch size (the bucket's mean until timed there enough)."""
        seconds, count = self.gauge_at_batch.get((bucket, batch), (0.0, 0))
        return seconds if count >= MIN_STEADY_SAMPLES else self.gauge_seconds[bucket]

    def _observe_gauge_at(self, bucket: int, batch: int, seconds: float, weight: float) -> None:
        """A gauge step at this batch size, with the weight it had in the bucket's mean (or more, while
        the batch size has had fewer samples): in a bucket of one batch size the two means agree."""
        mean, count = self.gauge_at_batch.get((bucket, batch), (seconds, 0))
        weight = max(weight, 1.0 / (count + 1))
        self.gauge_at_batch[(bucket, batch)] = (mean + weight * (seconds - mean), count + 1)

    def observe(self, batch: int, k: int, seconds: float, at: float | None = None) -> None:
        """A steady step of `seconds` at K that started at `at` (time.perf_counter seconds). With a
        start time, a probe's step waits for the gauge's steps around it (see `_settle`)."""
        bucket = batch_bucket(batch)
        key = (bucket, k)
        count = self.samples.get(key, 0)
        if count and seconds > PAUSE_FACTOR * self.mean_seconds(bucket, k):
            self.pauses_in_a_row[key] = self.pauses_in_a_row.get(key, 0) + 1
            if self.pauses_in_a_row[key] <= MAX_PAUSES_IN_A_ROW:
                return
            count = 0
        self.pauses_in_a_row[key] = 0
        if count and seconds * PAUSE_FACTOR < self.mean_seconds(bucket, k):
            count = 0
        if bucket not in self.gauge_seconds:  # the bucket's first timed step: its K gauges for now
            self.gauge_k[bucket], self.gauge_seconds[bucket] = k, seconds
            self.relative[key] = 1.0
            self._observe_gauge_at(bucket, batch, seconds, 1.0)
            self._count(bucket, k, count)
        elif k == self.gauge_k[bucket]:
            weight = self._weight(bucket, k, count)
            self.gauge_seconds[bucket] += weight * (seconds - self.gauge_seconds[bucket])
            self._observe_gauge_at(bucket, batch, seconds, weight)
            self._count(bucket, k, count)
        elif at is not None and self.follow_k.get(bucket) != k:  # a probe: compared when its neighbours are in
            restart = count == 0 < self.samples.get(key, 0)  # its mean starts again from this step
            self.waiting.setdefault(bucket, []).append((at, batch, k, seconds, restart))
        else:
            self._observe_relative(bucket, k, count, seconds / self._gauge_seconds_at(bucket, batch))
        if at is not None and bucket in self.gauge_k:
            if k == self.gauge_k[bucket]:
                self.recent_gauge.setdefault(bucket, deque(maxlen=RECENT_GAUGE_STEPS)).append((at, batch, seconds))
            self._settle(bucket, at)

    def _weight(self, bucket: int, k: int, count: int) -> float:
        """A new sample's weight in K's mean: a plain mean for the first samples, then a running mean
        that follows drift. Samples count for less as they age (half per STALE_HALF_LIFE steps timed
        in the bucket), so the first step of a probe after a long gap replaces much of a stale mean
        instead of nudging it."""
        return 1.0 if count == 0 else max(1.0 / (count * self.freshness(bucket, k) + 1), STEP_TIME_WEIGHT)

    def _count(self, bucket: int, k: int, count: int) -> None:
        self.samples[(bucket, k)] = count + 1
        self.timed_steps[bucket] = self.last_timed[(bucket, k)] = self.timed_steps.get(bucket, 0) + 1

    def _observe_relative(self, bucket: int, k: int, count: int, ratio: float) -> None:
        """A step of a K other than the gauge's, as its ratio to the gauge's step time."""
        key = (bucket, k)
        weight = self._weight(bucket, k, count)
        self.relative[key] = ratio if count == 0 else self.relative[key] + weight * (ratio - self.relative[key])
        self._count(bucket, k, count)
        if self.follow_k.get(bucket) == k != self.gauge_k[bucket]:
            self._rebase(bucket, k)

    def _settle(self, bucket: int, now: float) -> None:
        """Take each waiting probe step whose window has passed, if the gauge's steps inside the window
        (at the probe's batch size where LOCAL_REFERENCES of them are) ran at the gauge's usual
        speed: compared with the gauge's mean as any other step. One timed in a spell of another
        speed, or with fewer steps of the gauge around it, is left out."""
        waiting, recent = self.waiting.get(bucket), self.recent_gauge.get(bucket, ())
        if not waiting:
            return
        still_waiting = []
        for at, batch, k, seconds, restart in waiting:
            window = LOCAL_WINDOW_STEPS * max(seconds, self.gauge_seconds[bucket])
            if now - at <= window:
                still_waiting.append((at, batch, k, seconds, restart))
                continue
            near = [(b, s) for t, b, s in recent if abs(t - at) <= window]
            same_batch = [s for b, s in near if b == batch]
            if len(same_batch) >= LOCAL_REFERENCES:
                around, usual = same_batch, self._gauge_seconds_at(bucket, batch)
            else:
                around, usual = [s for _, s in near], self.gauge_seconds[bucket]
            if len(around) >= LOCAL_REFERENCES and abs(sum(around) / len(around) / usual - 1) <= LOCAL_SPEED_TOLERANCE:
                count = 0 if restart else self.samples.get((bucket, k), 0)
                self._observe_relative(bucket, k, count, seconds / usual)
            else:
                self.unreferenced_probe_steps += 1
        self.waiting[bucket] = still_waiting

    def measured(self, batch: int, max_k: int) -> dict[int, tuple[float, int]]:
        """K -> (mean seconds, samples) for the K's of this batch's bucket measured enough."""
        bucket = batch_bucket(batch)
        return {k: (self.mean_seconds(bucket, k), self.samples[(bucket, k)]) for k in range(max_k + 1)
                if self.samples.get((bucket, k), 0) >= MIN_STEADY_SAMPLES}

    def step_seconds(self, batch: int, max_k: int, predicted: Callable[[int, int], float]) -> list[float]:
        """Step seconds at K = 0..max_k at the largest batch of this batch's bucket (the size the
        observed times are scaled to): the fit, else the prediction scaled by the measured error."""
        measured = self.measured(batch, max_k)
        bucket = batch_bucket(batch)
        ks = sorted(measured)
        features = [[1.0, float(k > 0), float(k)] for k in ks]
        if not (0 in ks and len(ks) >= 3):  # the drafting step is not identifiable: fold it into base
            features = [[1.0, float(k)] for k in ks]
        if len(ks) >= 2:
            weights = [min(measured[k][1], 1.0 / STEP_TIME_WEIGHT) * self.freshness(bucket, k) for k in ks]
            fit = _least_squares(features, [measured[k][0] for k in ks], weights)
            if fit is not None:
                if len(fit) == 2:
                    fit = [fit[0], 0.0, fit[1]]
                fitted = [fit[0] + fit[1] * (k > 0) + fit[2] * k for k in range(max_k + 1)]
                if min(fitted) > 0:
                    return fitted
        ratios = sorted(seconds / predicted(bucket, k) for k, (seconds, _) in measured.items())
        scale = ratios[len(ratios) // 2] if ratios else 1.0
        return [predicted(bucket, k) * scale for k in range(max_k + 1)]

    def tokens_per_second(self, batch: int, max_k: int, acceptance: AcceptanceCurve,
                          predicted: Callable[[int, int], float]) -> list[float]:
        """Expected tokens per second per request at K = 0..max_k."""
        return [acceptance(k) / seconds
                for k, seconds in enumerate(self.step_seconds(batch, max_k, predicted))]


@dataclass(frozen=True)
class ScheduledStep:
    """What the scheduler scheduled at `started` (time.perf_counter seconds)."""

    started: float
    batch: int  # requests scheduled
    k: int  # draft tokens each proposes at the end of the step
    request_ids: frozenset[str]
    decode_only: bool  # every request scheduled exactly its verified tokens (no prefill, no new request)


@dataclass
class _BucketProbes:
    """When a bucket next tries another K, and which."""

    steps_until_probe: int = FIRST_PROBE_INTERVAL
    interval: int = FIRST_PROBE_INTERVAL
    probe_k: int | None = None
    probe_steps_left: int = 0
    best_before_probe: int | None = None
    ended_at: int | None = None  # `steps` when the last probe ended, while its steps wait to be compared
    steps: int = 0  # steps scheduled in the bucket
    probed_at: dict[int, int] = field(default_factory=dict)  # K -> `steps` when its last probe began
    # The gauge (K, seconds) when the last probe began: a drift past REPROBE_DRIFT since then
    # brings the next probe forward.
    gauge_at_probe: tuple[int, float] | None = None

    def due(self, k: int, regret: float | None) -> bool:
        """Whether K may be probed now: at once while unmeasured (regret None), else once the
        steps since its last probe (or since the bucket began) pay for what a probe of it loses."""
        if regret is None:
            return True
        wait = min(PROBE_STEPS * max(regret, 0.0) / PROBE_LOSS_BUDGET, MAX_REGRET_INTERVAL)
        return self.steps - self.probed_at.get(k, 0) >= wait


@dataclass
class OnlineSchedule:
    """Per engine: the K for each step, from measured step times (see the section comment).

    `predicted(batch, k)` gives the cost model's step seconds; `step_k` is called once per step
    with the batch size about to be scheduled, `record_step` with each finished steady step.
    """

    max_k: int
    predicted: Callable[[int, int], float]
    times: MeasuredStepTimes = field(default_factory=MeasuredStepTimes)
    probes: dict[int, _BucketProbes] = field(default_factory=dict)
    chosen: dict[int, int] = field(default_factory=dict)  # the K in force per bucket
    # Per bucket: (steady samples, acceptance curve) when its K was last chosen; the choice is
    # re-derived after REFIT_EVERY new samples or a new curve (not on every step: a fit costs ~0.1 ms).
    chosen_at: dict[int, tuple[int, AcceptanceCurve]] = field(default_factory=dict)
    # The last two steps scheduled, for timing the last one once the next is scheduled.
    recent_steps: list[ScheduledStep] = field(default_factory=list)
    # Buckets with two K's measured. Samples only grow, so a bucket never leaves this set; kept so
    # that a bucket still learning does not re-derive every bucket's measurements on each step.
    measured_buckets: set[int] = field(default_factory=set)
    # Per learned bucket: expected tokens/s at K = 0..max_k when its K was last chosen.
    expected_rates: dict[int, list[float]] = field(default_factory=dict)

    def record_step(self, batch: int, k: int, seconds: float, at: float | None = None) -> None:
        """A steady step's seconds, kept as what it would have taken at its bucket's largest batch;
        `at`: when it started (time.perf_counter seconds)."""
        bucket = batch_bucket(batch)
        if bucket != batch:
            seconds *= self.predicted(bucket, k) / self.predicted(batch, k)
        self.times.observe(batch, k, seconds, at)
        if bucket not in self.measured_buckets and len(self.times.measured(batch, self.max_k)) >= 2:
            self.measured_buckets.add(bucket)

    def summary(self) -> str:
        """Per batch-size bucket: the K in force and, per K measured there, its mean step time and
        steady steps (the engine logs this now and then)."""
        parts = []
        for bucket in sorted({b for b, _ in self.times.samples} | set(self.chosen)):
            measured = ", ".join(f"K={k} {1e3 * self.times.mean_seconds(b, k):.1f} ms x{n}"
                                 for (b, k), n in sorted(self.times.samples.items()) if b == bucket)
            parts.append(f"batch {bucket_label(bucket)}: K={self.chosen.get(bucket, '-')} ({measured or 'unmeasured'})")
        if self.times.unreferenced_probe_steps:
            parts.append(f"{self.times.unreferenced_probe_steps} probe steps left out (another speed around them)")
        return "; ".join(parts) or "no step scheduled yet"

    def step_scheduled(self, step: ScheduledStep) -> None:
        """Called as each step is scheduled; times the step before it when that one was steady: a
        decode-only step of the same requests as the steps on both sides of it (nothing arrived or
        left, so no idle wait sits in the interval), verifying drafts of its own K."""
        if len(self.recent_steps) == 2:
            before, last = self.recent_steps
            if last.decode_only and before.k == last.k and before.request_ids == last.request_ids == step.request_ids:
                self.record_step(last.batch, last.k, step.started - last.started, last.started)
        self.recent_steps = [*self.recent_steps[-1:], step]

    def learned(self, bucket: int) -> bool:
        """Whether the bucket chose its K from its own measurements (two K's measured there)."""
        return bucket in self.chosen and bucket in self.measured_buckets

    def nearest_learned_k(self, bucket: int) -> int | None:
        """The K of the learned bucket nearest to this one (on the buckets' log scale; the smaller
        batch on a tie), or None while no bucket has learned."""
        learned = [b for b in self.chosen if b != bucket and self.learned(b)]
        if not learned:
            return None
        position = bucket.bit_length()
        return self.chosen[min(learned, key=lambda b: (abs(b.bit_length() - position), b))]

    def best_k(self, batch: int, acceptance: AcceptanceCurve, default_k: int | None = None) -> int:
        """The K with the most expected tokens/s; the K in force unless another beats it by SWITCH_MARGIN.
        Where given, `default_k` (the start-up table's K) stands in a bucket until two of its K's
        are measured, unless another bucket has learned its K by then: the nearest such bucket's
        K stands instead. Measured step times have beaten the cost model's table wherever the two
        disagreed, and at high concurrency steady steps (the only ones timed) can be rare for long,
        so a bucket that has not learned yet starts from what its neighbour learned."""
        bucket = batch_bucket(batch)
        if default_k is not None and bucket not in self.measured_buckets:
            borrowed = self.nearest_learned_k(bucket)
            return self._choose(batch, default_k if borrowed is None else borrowed)
        samples = sum(n for (b, _), n in self.times.samples.items() if b == bucket)
        current = self.chosen.get(bucket)
        if current is not None and bucket in self.chosen_at:
            then, curve = self.chosen_at[bucket]
            if curve is acceptance and samples - then < REFIT_EVERY:
                return current
        self.chosen_at[bucket] = (samples, acceptance)
        rates = self.times.tokens_per_second(batch, self.max_k, acceptance, self.predicted)
        self.expected_rates[bucket] = rates
        best = max(range(self.max_k + 1), key=lambda k: (rates[k], -k))
        if current is not None and rates[best] <= (1 + SWITCH_MARGIN) * rates[current]:
            best = current
        return self._choose(batch, best)

    def _choose(self, batch: int, k: int) -> int:
        """Put K in force in the batch's bucket; its steps gauge the bucket's speed from now on."""
        bucket = batch_bucket(batch)
        if self.chosen.get(bucket) != k:
            self.chosen[bucket] = k
            self.times.follow(batch, k)
        return k

    def regret(self, bucket: int, k: int, best: int) -> float | None:
        """The share of tokens/s K loses against `best` in a learned bucket, by its last fit; None
        where K is not measured there (or the bucket has not learned)."""
        rates = self.expected_rates.get(bucket)
        if rates is None or not self.learned(bucket) or k not in self.times.measured(bucket, self.max_k):
            return None
        return 1.0 - rates[k] / rates[best]

    def step_k(self, batch: int, acceptance: AcceptanceCurve, default_k: int | None = None) -> int:
        """K for the next step at this batch size: the best (see best_k), or a probe's K while one runs."""
        bucket = batch_bucket(batch)
        probes = self.probes.setdefault(bucket, _BucketProbes())
        probes.steps += 1
        best = self.best_k(batch, acceptance, default_k)
        if probes.probe_steps_left:
            probes.probe_steps_left -= 1
            if probes.probe_steps_left == 0:
                probes.ended_at = probes.steps
            return probes.probe_k
        if probes.ended_at is not None:
            if self.times.waiting.get(bucket):  # no new probe before the last one's verdict
                return best
            # The last probe's steps are all compared: back off if they confirmed the choice.
            confirmed = best == probes.best_before_probe
            probes.interval = min(2 * probes.interval, MAX_PROBE_INTERVAL) if confirmed else FIRST_PROBE_INTERVAL
            probes.steps_until_probe = probes.interval - (probes.steps - probes.ended_at)
            probes.ended_at = None
        gauge = self.times.gauge(bucket)
        if gauge is not None and probes.gauge_at_probe is not None and gauge[0] == probes.gauge_at_probe[0] \
                and abs(gauge[1] / probes.gauge_at_probe[1] - 1) > REPROBE_DRIFT:
            # The speed moved: uniformly (the probes confirm the choice and back off again) or for
            # some K's more than others (what the probes are for). Once the gauge has caught up.
            probes.interval = FIRST_PROBE_INTERVAL
            probes.steps_until_probe = min(probes.steps_until_probe, REPROBE_AFTER)
            probes.gauge_at_probe = gauge
        probes.steps_until_probe -= 1
        if probes.steps_until_probe > 0:
            return best
        # Every other K may be probed, as often as what it loses pays for (`due`): a K far from the
        # one in force is re-timed too, so a ratio taken in the warm-up (when a new K's first steps
        # run slow) is not kept for good. Of the K's due, the one probed longest ago goes first.
        candidates = [k for k in range(self.max_k + 1)
                      if k != best and probes.due(k, self.regret(bucket, k, best))]
        if not candidates:
            probes.steps_until_probe = probes.interval
            return best
        probes.probe_k = min(candidates, key=lambda k: (probes.probed_at.get(k, -1), abs(k - best)))
        probes.probed_at[probes.probe_k] = probes.steps
        probes.gauge_at_probe = gauge
        probes.best_before_probe = best
        probes.probe_steps_left = PROBE_STEPS - 1
        return probes.probe_k

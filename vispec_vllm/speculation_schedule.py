"""Load-adaptive speculation for ViSpec drafts: how many draft tokens to propose at each number of
running requests (vLLM 0.32's dynamic-SD table, `num_speculative_tokens_per_batch_size`).

The table is the cost model's (vispec_vllm/cost_model.py): at each batch size, the K that
maximises predicted tokens/s for this target on this platform. It needs the draft's acceptance.
At start-up that is an assumed per-position rate (VISPEC_VLLM_ACCEPTANCE_RATE, default 0.75); once
the engine runs, the scheduler feeds every verified draft into `AdaptiveSchedule.record`
(patches/acceptance_feedback.py) and the table is re-derived from the measured acceptance curve:
after the first REDERIVE_EVERY drafts, then whenever the curve has moved (checked every
REDERIVE_EVERY drafts, at most once per MIN_REDERIVE_INTERVAL_S). K stays at least 1 for a
request running alone, so acceptance keeps being measured after traffic on which the draft was
useless.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from vispec_vllm.cost_model import H100, H200, THIS_CPU, AcceptanceCurve, Hardware, LanguageModelShape, derive_schedule

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

    def __post_init__(self) -> None:
        self.drafted = self.drafted or [0] * self.max_k
        self.accepted = self.accepted or [0] * self.max_k

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

    def initial(self) -> Schedule:
        return self._adopt(AcceptanceCurve.geometric(assumed_acceptance_rate(), max_k=self.max_k))

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

"""Patch: build a `ViSpecProposer` where vLLM builds an `EagleProposer` for a ViSpec draft.

vLLM function: `vllm.v1.spec_decode.eagle.EagleProposer.__new__` (vLLM 0.32.0), called from
`GPUModelRunner.__init__` (inherited by `CPUModelRunner`) for every EAGLE-style method.
Why: the ViSpec draft needs per-row inputs (compressed image tokens, dropped image rows, the
global image feature) that vLLM's EAGLE proposer does not produce. Returning the subclass from
`__new__` keeps every `isinstance(drafter, EagleProposer)` check in the runner true, and Python
then runs the subclass's `__init__`. Beside it, the runner's class gets the worker part of
patches/image_state_metrics.py (each step's output carries the proposer's image-state misses).
Guard: only when the draft config names a ViSpec architecture; plain EAGLE is untouched.
"""

from __future__ import annotations

from vispec_vllm.patches import image_state_metrics
from vispec_vllm.patches._wrap import wrap


def is_vispec_draft(vllm_config) -> bool:
    from vispec_vllm.checkpoint_format import VISPEC_ARCHITECTURES

    spec = getattr(vllm_config, "speculative_config", None)
    draft = getattr(spec, "draft_model_config", None)
    architectures = getattr(draft, "architectures", None) or []
    return any(arch in VISPEC_ARCHITECTURES.values() for arch in architectures)


def _make_new(original_new):
    from vllm.v1.spec_decode.eagle import EagleProposer

    def __new__(cls, vllm_config, device=None, runner=None):  # EagleProposer.__init__'s arguments
        if cls is EagleProposer and is_vispec_draft(vllm_config):
            from vispec_vllm.proposer import ViSpecProposer

            if runner is not None:
                image_state_metrics.apply_to_model_runner(type(runner))
            cls = ViSpecProposer
        return original_new(cls)  # object.__new__: it takes the class alone

    return __new__


def apply() -> None:
    from vllm.v1.spec_decode.eagle import EagleProposer

    wrap(EagleProposer, "__new__", _make_new)

"""Patch: route a published ViSpec checkpoint to the ViSpec draft, with no user effort.

vLLM function: `vllm.config.speculative.SpeculativeConfig.__post_init__` (vLLM 0.32.0).
Why: a published ViSpec draft's config.json names a plain `LlamaForCausalLM` / `Qwen2ForCausalLM`,
so vLLM would treat it as a separate `draft_model` (or, with method "eagle", as plain EAGLE). Only
its weights (`imadpt.*`, `img_fc.*`) say it is ViSpec. This wrapper recognises such a checkpoint
before vLLM resolves the method, runs it as method "eagle" (vLLM's EAGLE machinery is what
drafts with target hidden states), and, for the duration of the original call, extends the
draft config's hf_overrides (built by `SpeculativeConfig.compose_draft_hf_overrides`) so that
the draft config names the registered ViSpec architecture and carries `vispec_num_q`, `qkv_bias`
and `bias`. It then validates the checkpoint against the target, before any KV memory is taken.
The draft runs eager (`enforce_eager`): its per-row image inputs are set outside its forward.
It also turns on load-adaptive speculation (vLLM's `num_speculative_tokens_per_batch_size`)
unless the user gave a table or set VISPEC_VLLM_ADAPTIVE=0: the table is derived from the cost
model for the target's shapes on this platform (vispec_vllm/speculation_schedule.py), and the
draft config is marked `vispec_adaptive_schedule` so that the scheduler keeps it in step with
the measured acceptance (patches/acceptance_feedback.py).
Guard: nothing changes unless `model` resolves to a checkpoint with ViSpec weights and the method
is unset, "eagle" or "draft_model".
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vllm.vispec_vllm")
_ROUTABLE_METHODS = (None, "eagle", "draft_model")


def _target_family(target_hf_config) -> str | None:
    model_type = getattr(target_hf_config, "model_type", "")
    if model_type.startswith("qwen"):
        return "qwen2"
    if model_type.startswith("llava"):
        return "llama"
    return None


def vispec_draft_hf_override(architecture: str, draft_fields: dict, composed, hf_config):
    """Module-level (picklable: the draft ModelConfig travels to engine-core processes)."""
    hf_config = composed(hf_config)
    hf_config.architectures = [architecture]
    for key, value in draft_fields.items():
        setattr(hf_config, key, value)
    return hf_config


def apply() -> None:
    from vllm.config.speculative import SpeculativeConfig

    if getattr(SpeculativeConfig.__post_init__, "_vispec_patched", False):
        return
    original_post_init = SpeculativeConfig.__post_init__

    def __post_init__(self) -> None:
        from vispec_vllm.checkpoint import (
            load_checkpoint_description,
            looks_like_vispec,
            validate_against_target,
        )

        if self.method not in _ROUTABLE_METHODS or not looks_like_vispec(self.model):
            return original_post_init(self)
        from vispec_vllm.speculation_schedule import AdaptiveSchedule, adaptive_enabled, describe

        checkpoint = load_checkpoint_description(self.model)
        self.method = "eagle"
        adaptive = (adaptive_enabled() and bool(self.num_speculative_tokens)
                    and self.num_speculative_tokens_per_batch_size is None)
        # The proposer hands the draft per-row image inputs outside its forward; a captured
        # (CUDA-graph) draft forward would replay stale ones. Eager drafting on GPU, as on CPU.
        self.enforce_eager = True
        draft_fields = {"vispec_num_q": checkpoint.num_q, "qkv_bias": checkpoint.qkv_bias,
                        "bias": checkpoint.has_bias, "vispec_adaptive_schedule": adaptive}
        compose = SpeculativeConfig.compose_draft_hf_overrides

        def compose_for_vispec(target_hf_overrides):
            return functools.partial(vispec_draft_hf_override, checkpoint.architecture, draft_fields,
                                     compose(target_hf_overrides))

        SpeculativeConfig.compose_draft_hf_overrides = staticmethod(compose_for_vispec)
        try:
            original_post_init(self)
        finally:
            SpeculativeConfig.compose_draft_hf_overrides = staticmethod(compose)

        target = self.target_model_config
        target_text_config = target.hf_config.get_text_config()
        validate_against_target(checkpoint, target_text_config.hidden_size, target_text_config.vocab_size,
                                _target_family(target.hf_config))
        if adaptive:
            self.num_speculative_tokens_per_batch_size = AdaptiveSchedule.for_target(
                self.num_speculative_tokens, target_text_config, target.max_model_len).initial()
            logger.info("vispec-vllm: load-adaptive speculation (VISPEC_VLLM_ADAPTIVE=0 turns it off), draft tokens "
                        "per running batch size: %s", describe(self.num_speculative_tokens_per_batch_size))
        logger.info("vispec-vllm: %s is a ViSpec draft (num_q=%d); drafting with %s",
                    checkpoint.directory, checkpoint.num_q, checkpoint.architecture)

    __post_init__._vispec_patched = True
    SpeculativeConfig.__post_init__ = __post_init__

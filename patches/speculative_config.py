"""Patch: route a published ViSpec checkpoint to the ViSpec draft, with no user effort.

vLLM function: `vllm.config.speculative.SpeculativeConfig.__post_init__` (vLLM 0.32.0).
Why: a published ViSpec draft's config.json names a plain `LlamaForCausalLM` / `Qwen2ForCausalLM`,
so vLLM would treat it as a separate `draft_model` (or, with method "eagle", as plain EAGLE). Only
its weights (`imadpt.*`, `img_fc.*`) say it is ViSpec. This wrapper recognises such a checkpoint
before vLLM resolves the method, runs it as method "eagle" (vLLM's EAGLE machinery is what
drafts with target hidden states), and, for the duration of the original call, extends the
draft config's hf_overrides (built by `SpeculativeConfig.compose_draft_hf_overrides`) so that
the draft config names the registered ViSpec architecture and carries the checkpoint's
`ViSpecDraftConfig` (vispec_vllm/checkpoint_format.py: num_q, head_dim, biases, the key-mask head
size for this platform's attention backend, the unused tensors the loader skips) as one attribute.
It then validates the checkpoint against the target, before any KV memory is taken.
The draft compiles, and on GPU is captured in CUDA graphs, wherever vLLM does so for its own EAGLE
draft (vispec_vllm/draft_model.py); VISPEC_VLLM_EAGER_DRAFT=1 sets `enforce_eager` for the draft.
It also turns on load-adaptive speculation (vLLM's `num_speculative_tokens_per_batch_size`)
unless the user gave a table or set VISPEC_VLLM_ADAPTIVE=0: the table is derived from the cost
model for the target's shapes on this platform (vispec_vllm/speculation_schedule.py), and the
draft config says so (`ViSpecDraftConfig.adaptive_schedule`) so that the scheduler keeps it in
step with the measured acceptance (patches/acceptance_feedback.py).
A checkpoint in the plain EAGLE layout (fc + layer 0, no adaptor, no lm_head) given with no method
would likewise be taken for a `draft_model` and fail on its names; it runs as method "eagle".
Guard: nothing changes unless `model` resolves to a checkpoint with ViSpec weights and the method
is unset, "eagle" or "draft_model", or to a plain EAGLE checkpoint and the method is unset.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from vispec_vllm.patches._wrap import wrap

if TYPE_CHECKING:
    from vispec_vllm.checkpoint_format import ViSpecDraftConfig

logger = logging.getLogger("vllm.vispec_vllm")
_ROUTABLE_METHODS = (None, "eagle", "draft_model")


def vispec_draft_hf_override(architecture: str, draft_config: ViSpecDraftConfig, composed, hf_config):
    """Module-level (picklable: the draft ModelConfig travels to engine-core processes)."""
    hf_config = composed(hf_config)
    hf_config.architectures = [architecture]
    draft_config.store_in(hf_config)
    return hf_config


def attention_head_sizes() -> tuple[int, ...] | None:
    """The head sizes this platform's attention backend takes; None where any multiple of 8 does
    (FlashAttention and friends on GPU)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    return None


def _make_post_init(original_post_init):
    from vllm.config.speculative import SpeculativeConfig

    def __post_init__(self) -> None:
        from vispec_vllm.checkpoint import (
            checkpoint_layout,
            load_checkpoint_description,
            validate_against_target,
        )
        from vispec_vllm.checkpoint_format import target_family

        # One read of the weight names decides both routings.
        layout = checkpoint_layout(self.model) if self.method in _ROUTABLE_METHODS else None
        if self.method is None and layout == "eagle":
            # vLLM would take a draft with no method for a separate `draft_model` and fail on the
            # EAGLE names (no `model.` prefix, no lm_head); its weights say it is plain EAGLE.
            logger.info("vispec-vllm: %s holds a plain EAGLE draft (fc + layer 0, no vision adaptor); "
                        "running it with method 'eagle'", self.model)
            self.method = "eagle"
            return original_post_init(self)
        if layout != "vispec":
            return original_post_init(self)
        from vispec_vllm.speculation_schedule import AdaptiveSchedule, adaptive_enabled, describe

        checkpoint = load_checkpoint_description(self.model)
        self.method = "eagle"
        adaptive = (adaptive_enabled() and bool(self.num_speculative_tokens)
                    and self.num_speculative_tokens_per_batch_size is None)
        from vispec_vllm.draft_model import eager_draft_forced

        # Compiled and captured like vLLM's own EAGLE draft unless the user asks for eager drafting
        # (the draft's forward reads row buffers the proposer refills in place: capture-safe).
        if eager_draft_forced():
            self.enforce_eager = True
        draft_config = checkpoint.vispec_draft_config(attention_head_sizes(), adaptive)
        compose = SpeculativeConfig.compose_draft_hf_overrides

        def compose_for_vispec(target_hf_overrides):
            return functools.partial(vispec_draft_hf_override, checkpoint.architecture, draft_config,
                                     compose(target_hf_overrides))

        SpeculativeConfig.compose_draft_hf_overrides = staticmethod(compose_for_vispec)
        try:
            original_post_init(self)
        finally:
            SpeculativeConfig.compose_draft_hf_overrides = staticmethod(compose)

        target = self.target_model_config
        target_text_config = target.hf_config.get_text_config()
        validate_against_target(checkpoint, target_text_config.hidden_size, target_text_config.vocab_size,
                                target_family(getattr(target.hf_config, "model_type", "")))
        if adaptive:
            self.num_speculative_tokens_per_batch_size = AdaptiveSchedule.for_target(
                self.num_speculative_tokens, target_text_config, target.max_model_len).initial()
            logger.info("vispec-vllm: load-adaptive speculation (VISPEC_VLLM_ADAPTIVE=0 turns it off), draft tokens "
                        "per running batch size: %s", describe(self.num_speculative_tokens_per_batch_size))
        logger.info("vispec-vllm: %s is a ViSpec draft (num_q=%d); drafting with %s",
                    checkpoint.directory, checkpoint.dims.num_q, checkpoint.architecture)

    return __post_init__


def apply() -> None:
    from vllm.config.speculative import SpeculativeConfig

    wrap(SpeculativeConfig, "__post_init__", _make_post_init)

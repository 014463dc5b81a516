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
unless the user gave a table or set VISPEC_VLLM_ADAPTIVE=0.
Guard: nothing changes unless `model` resolves to a checkpoint with ViSpec weights and the method
is unset, "eagle" or "draft_model".
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger("vllm.vispec_vllm")
_ROUTABLE_METHODS = (None, "eagle", "draft_model")
# Load-adaptive speculation (default on for ViSpec; VISPEC_VLLM_ADAPTIVE=0 turns it off, and an
# explicit num_speculative_tokens_per_batch_size wins): fewer draft tokens as the batch grows,
# none past 32 running requests, where verification makes the target compute-bound. The
# crossover points are provisional until benchmarks/ measures them per machine.
ADAPTIVE_ENV = "VISPEC_VLLM_ADAPTIVE"


def adaptive_schedule(num_speculative_tokens: int) -> list[tuple[int, int, int]]:
    """vLLM's dynamic-SD table: (first batch size, last batch size, draft tokens)."""
    k = num_speculative_tokens
    return [(1, 8, k), (9, 16, max(1, k - 1)), (17, 32, 1), (33, 1_000_000, 0)]


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
        checkpoint = load_checkpoint_description(self.model)
        self.method = "eagle"
        adaptive = os.environ.get(ADAPTIVE_ENV, "1") != "0"
        if adaptive and self.num_speculative_tokens and self.num_speculative_tokens_per_batch_size is None:
            self.num_speculative_tokens_per_batch_size = adaptive_schedule(self.num_speculative_tokens)
        # The proposer hands the draft per-row image inputs outside its forward; a captured
        # (CUDA-graph) draft forward would replay stale ones. Eager drafting on GPU, as on CPU.
        self.enforce_eager = True
        draft_fields = {"vispec_num_q": checkpoint.num_q, "qkv_bias": checkpoint.qkv_bias,
                        "bias": checkpoint.has_bias}
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
        logger.info("vispec-vllm: %s is a ViSpec draft (num_q=%d); drafting with %s",
                    checkpoint.directory, checkpoint.num_q, checkpoint.architecture)

    __post_init__._vispec_patched = True
    SpeculativeConfig.__post_init__ = __post_init__

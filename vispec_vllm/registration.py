"""What the plugin does in every vLLM process: register the draft architectures, apply patches."""

from __future__ import annotations

from vispec_vllm.checkpoint import VISPEC_ARCHITECTURES


def register_with_vllm() -> None:
    from vllm import ModelRegistry

    from vispec_vllm.patches import (
        acceptance_feedback,
        cpu_sampling_fallbacks,
        eagle_chunk_boundary,
        eagle_proposer,
        image_limits,
        image_state_metrics,
        model_runner_choice,
        request_kind_metrics,
        serve_flags,
        speculative_config,
    )

    for architecture in VISPEC_ARCHITECTURES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            # Llama- and Qwen2-family drafts differ only in config values (qkv bias, RoPE theta).
            ModelRegistry.register_model(architecture, "vispec_vllm.draft_model:ViSpecDraftModel")
    speculative_config.apply()
    eagle_proposer.apply()
    model_runner_choice.apply()
    serve_flags.apply()
    image_limits.apply()
    request_kind_metrics.apply()
    acceptance_feedback.apply()
    image_state_metrics.apply()  # its worker part: ViSpecProposer, on its runner's class
    # vLLM's own bugs, fixed for every speculative method (not only ViSpec drafts).
    cpu_sampling_fallbacks.apply()
    eagle_chunk_boundary.apply()

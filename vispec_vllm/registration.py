"""What the plugin does in every vLLM process: register the draft architectures, apply the patch units."""

from __future__ import annotations

from types import ModuleType

from vispec_vllm.checkpoint_format import VISPEC_ARCHITECTURES
from vispec_vllm.patches import (
    acceptance_feedback,
    cpu_sampling_fallbacks,
    draft_tokens_with_output,
    eagle_chunk_boundary,
    eagle_proposer,
    image_limits,
    image_state_metrics,
    model_runner_choice,
    request_kind_metrics,
    serve_flags,
    speculative_config,
)
from vispec_vllm.patches._wrap import PatchError

# The patch units applied on plugin load, by the process whose behaviour they change, as the index
# (patches/__init__.py) labels them on its "process" lines. Not here: cli_version (applied by the
# `vispec-vllm` command) and image_state_metrics' worker part (applied to the model runner's class
# when a ViSpec proposer is built).
# Every process applies every group: the plugin loads once per process, before vLLM has said which
# roles the process plays, and one process often plays several (the caller's process is API server,
# engine core and worker for an in-process `LLM`; the engine-core process hosts the worker of the
# "uni" executor). A unit only changes symbols its process reads, so elsewhere it costs an import.
PATCH_UNITS_BY_PROCESS: dict[str, tuple[ModuleType, ...]] = {
    "API server": (speculative_config, serve_flags, image_limits, request_kind_metrics, image_state_metrics),
    "engine core": (acceptance_feedback, image_state_metrics, draft_tokens_with_output),
    "worker": (eagle_proposer, cpu_sampling_fallbacks, eagle_chunk_boundary, draft_tokens_with_output),
    "any": (model_runner_choice,),
}


def apply_unit(unit: ModuleType) -> None:
    """Apply one patch unit; any failure stops start-up with a message that names the unit."""
    try:
        unit.apply()
    except PatchError:
        raise
    except Exception as err:
        raise PatchError(unit.__name__, f"cannot be applied: {type(err).__name__}: {err}") from err


def register_with_vllm() -> None:
    from vllm import ModelRegistry

    for architecture in VISPEC_ARCHITECTURES.values():
        if architecture not in ModelRegistry.get_supported_archs():
            # Llama- and Qwen2-family drafts differ only in config values (qkv bias, RoPE theta).
            ModelRegistry.register_model(architecture, "vispec_vllm.draft_model:ViSpecDraftModel")
    applied: set[ModuleType] = set()
    for units in PATCH_UNITS_BY_PROCESS.values():
        for unit in units:
            if unit not in applied:  # a unit labelled with two processes is applied once
                apply_unit(unit)
                applied.add(unit)

"""Patch: keep ViSpec drafts on vLLM's V1 model runner.

vLLM function: `vllm.config.vllm.VllmConfig._get_v2_model_runner_unsupported_features`
(vLLM 0.32.0), which `use_v2_model_runner` consults on GPU, where Model Runner V2 is otherwise the
default. Why: ViSpec's proposer plugs into the V1 runner's EAGLE proposer; MRV2's speculators are
a different code path. Listing ViSpec as unsupported makes vLLM itself log one line ("Model Runner
V2 does not yet support ViSpec drafts (vispec-vllm); using the V1 model runner instead.") and
use V1, exactly as for its own unsupported features. On CPU, V1 is already used (no Triton).
A user who forces V2 (`VLLM_USE_V2_MODEL_RUNNER=1`) gets vLLM's own start-up error, "Model Runner V2
does not yet support: ViSpec drafts (vispec-vllm)", from `VllmConfig._validate_v2_model_runner`,
which reads the same list, instead of a ViSpec draft run without its proposer.
Guard: only when the draft config names a ViSpec architecture.
"""

from __future__ import annotations

from vispec_vllm.patches._wrap import wrap


def _make_unsupported_features(original_unsupported_features):
    from vispec_vllm.patches.eagle_proposer import is_vispec_draft

    def _get_v2_model_runner_unsupported_features(self):
        unsupported = list(original_unsupported_features(self))
        if is_vispec_draft(self):
            unsupported.append("ViSpec drafts (vispec-vllm)")
        return unsupported

    return _get_v2_model_runner_unsupported_features


def apply() -> None:
    from vllm.config.vllm import VllmConfig

    wrap(VllmConfig, "_get_v2_model_runner_unsupported_features", _make_unsupported_features)

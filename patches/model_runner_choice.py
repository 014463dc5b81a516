"""Patch: keep ViSpec drafts on vLLM's V1 model runner.

vLLM function: `vllm.config.vllm.VllmConfig._get_v2_model_runner_unsupported_features`
(vLLM 0.32.0), which `use_v2_model_runner` consults on GPU, where Model Runner V2 is otherwise the
default. Why: ViSpec's proposer plugs into the V1 runner's EAGLE proposer; MRV2's speculators are
a different code path. Listing ViSpec as unsupported makes vLLM itself log one line ("Model Runner
V2 does not yet support ViSpec drafts (vispec-vllm); using the V1 model runner instead.") and
use V1, exactly as for its own unsupported features. On CPU, V1 is already used (no Triton).
Guard: only when the draft config names a ViSpec architecture.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.config.vllm import VllmConfig

    original = VllmConfig._get_v2_model_runner_unsupported_features
    if getattr(original, "_vispec_patched", False):
        return

    def _get_v2_model_runner_unsupported_features(self):
        from vispec_vllm.patches.eagle_proposer import is_vispec_draft

        unsupported = list(original(self))
        if is_vispec_draft(self):
            unsupported.append("ViSpec drafts (vispec-vllm)")
        return unsupported

    _get_v2_model_runner_unsupported_features._vispec_patched = True
    VllmConfig._get_v2_model_runner_unsupported_features = _get_v2_model_runner_unsupported_features

"""patches/model_runner_choice.py: a ViSpec draft runs on vLLM's V1 model runner, where vLLM would pick V2.

vLLM 0.32 picks Model Runner V2 by default where Triton runs (`VllmConfig.use_v2_model_runner`,
vllm/config/vllm.py) unless `_get_v2_model_runner_unsupported_features` lists something. ViSpecProposer
extends the V1 runner's EAGLE proposer, so on V2 a ViSpec draft would run without it. These tests build
the engine config for the shipped demo pair (no engine) and ask vLLM's own property as it would be asked
on a GPU: with Triton available and VLLM_USE_V2_MODEL_RUNNER unset.
"""

from __future__ import annotations

import pytest

from vispec_vllm.demo.models import DEMO_DRAFTS, DEMO_TARGET


@pytest.fixture(scope="module")
def vispec_config():
    """The VllmConfig of the demo target with its ViSpec draft, as `LLM(...)` would build it."""
    from vllm.engine.arg_utils import EngineArgs

    import vispec_vllm

    vispec_vllm.register()
    args = EngineArgs(model=str(DEMO_TARGET), dtype="float32", max_model_len=1024, enforce_eager=True,
                      speculative_config={"model": str(DEMO_DRAFTS["vispec"]), "num_speculative_tokens": 3})
    return args.create_engine_config()


@pytest.fixture
def where_triton_runs(monkeypatch):
    import vllm.config.vllm

    monkeypatch.setattr(vllm.config.vllm, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


@pytest.mark.usefixtures("where_triton_runs")
def test_a_vispec_draft_keeps_the_v1_model_runner_where_vllm_would_pick_v2(vispec_config, monkeypatch):
    from vispec_vllm.patches._wrap import original_of
    from vllm.config.vllm import VllmConfig

    assert vispec_config.speculative_config.draft_model_config.architectures == ["EagleViSpecLlamaForCausalLM"]
    assert vispec_config.speculative_config.method == "eagle"
    assert "ViSpec drafts (vispec-vllm)" in vispec_config._get_v2_model_runner_unsupported_features()
    assert not vispec_config.use_v2_model_runner

    # Without the patch, vLLM itself would run this config on Model Runner V2.
    unpatched = original_of(VllmConfig, "_get_v2_model_runner_unsupported_features")
    monkeypatch.setattr(VllmConfig, "_get_v2_model_runner_unsupported_features", unpatched)
    assert vispec_config.use_v2_model_runner


@pytest.mark.usefixtures("where_triton_runs")
def test_forcing_v2_for_a_vispec_draft_is_refused_at_start_up(vispec_config, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert vispec_config.use_v2_model_runner  # the user's choice wins in vLLM's property...
    with pytest.raises(ValueError, match=r"Model Runner V2 does not yet support: .*ViSpec drafts \(vispec-vllm\)"):
        vispec_config._validate_v2_model_runner()  # ...and vLLM's start-up validation refuses it

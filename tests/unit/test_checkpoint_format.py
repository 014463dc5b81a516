"""The ViSpec draft checkpoint format (vispec_vllm/checkpoint_format.py), the factory's drafts and the
checkpoint validator (vispec_vllm/checkpoint.py), without an engine.

Expected names, shapes and config keys are written here from the published format's tables (the
state-dict keys of the published `JLKang/ViSpec-*` drafts, as functions of the target's dims, and
their config keys), not taken from the code under test.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vispec_vllm.checkpoint import (
    ViSpecCheckpointError,
    checkpoint_layout,
    load_checkpoint_description,
)
from vispec_vllm.checkpoint_format import (
    KEEP_IMAGE_ROWS_KEY,
    VISPEC_DRAFT_CONFIG_ATTRIBUTE,
    DraftDims,
    ViSpecDraftConfig,
    draft_config,
    draft_family,
    eagle_shapes,
    masked_head_size,
    published_shapes,
    target_family,
    vispec_shapes,
    weight_layout,
)
from vispec_vllm.demo.models import DEMO_DRAFTS, DEMO_TARGET
from vispec_vllm.draft_model import ViSpecDraftModel
from vispec_vllm.factory.tiny_models import write_tiny_models, write_vispec_draft

TINY_TARGETS = ("tiny-llava", "tiny-llava-next", "tiny-qwen2_5_vl")


def published_keys(H: int, nh: int, hd: int, I: int, V: int, q: int, qkv_bias: bool,  # noqa: E741
                   bias: bool = True, embed: bool = True) -> dict[str, tuple]:
    keys = {
        "embed_tokens.weight": (V, H),
        "layers.0.self_attn.q_proj.weight": (nh * hd, H),
        "layers.0.self_attn.k_proj.weight": (nh * hd, H),
        "layers.0.self_attn.v_proj.weight": (nh * hd, H),
        "layers.0.self_attn.o_proj.weight": (H, nh * hd),
        "layers.0.mlp.gate_proj.weight": (I, H),
        "layers.0.mlp.up_proj.weight": (I, H),
        "layers.0.mlp.down_proj.weight": (H, I),
        "layers.0.post_attention_layernorm.weight": (H,),
        "fc.weight": (H, 2 * H),
        "fc.bias": (H,),
        "imadpt.q": (q, nh, hd),
        "imadpt.k_proj.weight": (nh * hd, H),
        "imadpt.v_proj.weight": (nh * hd, H),
        "imadpt.o_proj.weight": (H, nh * hd),
        "img_fc.weight": (H, 2 * H),
        "img_fc.bias": (H,),
    }
    if qkv_bias:
        for name in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
                     "imadpt.k_proj", "imadpt.v_proj"):
            keys[f"{name}.bias"] = (nh * hd,)
    if not bias:
        del keys["fc.bias"], keys["img_fc.bias"]
    if not embed:
        del keys["embed_tokens.weight"]
    return keys


def target_text_dims(target_dir) -> tuple[int, int, int, int, bool]:
    text = json.loads((target_dir / "config.json").read_text())["text_config"]
    return (text["hidden_size"], text["num_attention_heads"], text["intermediate_size"], text["vocab_size"],
            text["model_type"].startswith("qwen"))


# (H, nh, I, V, qkv_bias): the tiny targets' language models and two published draft configs.
DIMS = {
    "tiny-llava": (128, 4, 256, 512, False),
    "tiny-qwen2_5_vl": (128, 4, 256, 512, True),
    "llava-1.6-7b": (4096, 32, 11008, 32064, False),
    "qwen2.5-vl-3b": (2048, 16, 11008, 151936, True),
}


@pytest.mark.parametrize("bias, embed", [(True, True), (False, True), (True, False)],
                         ids=["published", "no-fc-bias", "no-embed"])
@pytest.mark.parametrize("num_q", [2, 5])
@pytest.mark.parametrize("model", list(DIMS))
def test_published_shapes_are_the_tables(model, num_q, bias, embed):
    H, nh, I, V, qkv_bias = DIMS[model]  # noqa: E741
    dims = DraftDims(H, nh, H // nh, I, V, qkv_bias, num_q=num_q, has_bias=bias, has_embed_tokens=embed)
    expected = published_keys(H, nh, H // nh, I, V, num_q, qkv_bias, bias, embed)
    assert published_shapes(dims) == expected
    # The EAGLE part is what a plain EAGLE draft holds; the ViSpec part is the adaptor and img_fc.
    vispec_part = {k: v for k, v in expected.items() if k.startswith(("imadpt.", "img_fc."))}
    assert vispec_shapes(dims) == vispec_part
    assert eagle_shapes(dims) == {k: v for k, v in expected.items() if k not in vispec_part}


@pytest.mark.parametrize("num_q", [2, 5])
def test_tiny_drafts_have_published_keys_and_shapes(tiny_models, tmp_path, num_q):
    for target in TINY_TARGETS:
        H, nh, I, V, is_qwen = target_text_dims(tiny_models / target)  # noqa: E741
        if num_q == 2:  # as the factory writes them
            draft_dir = tiny_models / f"{target}-vispec"
            files = ["model.safetensors"]
        else:
            draft_dir = tmp_path / f"{target}-q{num_q}"
            embed = load_file(tiny_models / f"{target}-vispec" / "model.safetensors")["embed_tokens.weight"]
            write_vispec_draft(draft_dir, DraftDims(H, nh, H // nh, I, V, is_qwen), "qwen2" if is_qwen else "llama",
                               embed, seed=0, num_q=num_q, write_bin=True)
            files = ["model.safetensors", "pytorch_model.bin"]
        expected = published_keys(H, nh, H // nh, I, V, num_q, qkv_bias=is_qwen)
        for file in files:
            weights = (load_file(draft_dir / file) if file.endswith(".safetensors")
                       else torch.load(draft_dir / file, weights_only=True))
            assert {k: tuple(v.shape) for k, v in weights.items()} == expected, (target, file)
        config = json.loads((draft_dir / "config.json").read_text())
        assert config["num_hidden_layers"] == 1
        assert config["hidden_size"] == H and config["vocab_size"] == V and config["intermediate_size"] == I
        assert config["num_attention_heads"] == config["num_key_value_heads"] == nh
        assert config.get("qkv_bias", False) == is_qwen
        assert "bias" not in config and "num_q" not in config  # absent in the published configs
        assert config["architectures"] == (["Qwen2ForCausalLM"] if is_qwen else ["LlamaForCausalLM"])
        # The published drafts carry a frozen copy of the target's input embedding.
        target_weights = load_file(tiny_models / target / "model.safetensors")
        target_embed = next(v for k, v in target_weights.items()
                            if k.endswith("embed_tokens.weight") and "vision" not in k)
        assert torch.equal(load_file(draft_dir / "model.safetensors")["embed_tokens.weight"], target_embed)


def test_factory_is_deterministic(tmp_path):
    a = write_tiny_models(tmp_path / "a", seed=3)
    b = write_tiny_models(tmp_path / "b", seed=3)
    for name in a:
        wa, wb = load_file(a[name] / "model.safetensors"), load_file(b[name] / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


# Config keys of the published drafts: common to both families, then per family.
COMMON_CONFIG_KEYS = {"architectures", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
                      "initializer_range", "intermediate_size", "max_position_embeddings", "model_type",
                      "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pretraining_tp",
                      "rms_norm_eps", "rope_scaling", "tie_word_embeddings", "torch_dtype", "transformers_version",
                      "use_cache", "vocab_size"}
FAMILY_CONFIG_KEYS = {"llama": {"pad_token_id"},
                      "qwen2": {"rope_theta", "qkv_bias", "attention_dropout", "max_window_layers", "sliding_window",
                                "use_sliding_window"}}


@pytest.mark.parametrize("family, qkv_bias, rms_norm_eps", [("llama", False, 1e-5), ("qwen2", True, 1e-6)])
@pytest.mark.parametrize("bias", [True, False])
def test_draft_config_fields(family, qkv_bias, rms_norm_eps, bias):
    config = draft_config(DraftDims(4096, 32, 128, 11008, 32064, qkv_bias, has_bias=bias), family)
    assert set(config) == COMMON_CONFIG_KEYS | FAMILY_CONFIG_KEYS[family] | (set() if bias else {"bias"})
    assert config["model_type"] == family and draft_family(config["model_type"]) == family
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (4096, 11008, 32064)
    assert config["num_attention_heads"] == config["num_key_value_heads"] == 32
    assert config["num_hidden_layers"] == 1 and config["rms_norm_eps"] == rms_norm_eps
    assert config.get("qkv_bias", False) == qkv_bias and config.get("bias", True) == bias
    with pytest.raises(ValueError, match="qkv_bias"):
        draft_config(DraftDims(4096, 32, 128, 11008, 32064, not qkv_bias), family)
    with pytest.raises(ValueError, match="unknown draft family"):
        draft_config(DraftDims(4096, 32, 128, 11008, 32064, qkv_bias), "llava")


def test_draft_config_of_a_draft_keeping_image_rows():
    dims = DraftDims(4096, 32, 128, 11008, 32064, False)
    # The project's own key, and only it, on top of the published config; it is not a published key.
    assert KEEP_IMAGE_ROWS_KEY == "vispec_keep_image_rows" and KEEP_IMAGE_ROWS_KEY not in COMMON_CONFIG_KEYS
    assert draft_config(dims, "llama", keep_image_rows=True) == {**draft_config(dims, "llama"),
                                                                  KEEP_IMAGE_ROWS_KEY: True}


# Where each published weight lands in the vLLM draft module (vLLM's EAGLE Llama layout: `model.`
# prefix, fused qkv_proj / gate_up_proj loaded by shard; the adaptor at the top level, unfused).
EXPECTED_MAPPING = {
    "embed_tokens.weight": ("model.embed_tokens.weight", None),
    "layers.0.self_attn.q_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", "q"),
    "layers.0.self_attn.q_proj.bias": ("model.layers.0.self_attn.qkv_proj.bias", "q"),
    "layers.0.self_attn.k_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", "k"),
    "layers.0.self_attn.k_proj.bias": ("model.layers.0.self_attn.qkv_proj.bias", "k"),
    "layers.0.self_attn.v_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", "v"),
    "layers.0.self_attn.v_proj.bias": ("model.layers.0.self_attn.qkv_proj.bias", "v"),
    "layers.0.self_attn.o_proj.weight": ("model.layers.0.self_attn.o_proj.weight", None),
    "layers.0.mlp.gate_proj.weight": ("model.layers.0.mlp.gate_up_proj.weight", 0),
    "layers.0.mlp.up_proj.weight": ("model.layers.0.mlp.gate_up_proj.weight", 1),
    "layers.0.mlp.down_proj.weight": ("model.layers.0.mlp.down_proj.weight", None),
    "layers.0.post_attention_layernorm.weight": ("model.layers.0.post_attention_layernorm.weight", None),
    "fc.weight": ("model.fc.weight", None),
    "fc.bias": ("model.fc.bias", None),
    "imadpt.q": ("imadpt.q", None),
    "imadpt.k_proj.weight": ("imadpt.k_proj.weight", None),
    "imadpt.k_proj.bias": ("imadpt.k_proj.bias", None),
    "imadpt.v_proj.weight": ("imadpt.v_proj.weight", None),
    "imadpt.v_proj.bias": ("imadpt.v_proj.bias", None),
    "imadpt.o_proj.weight": ("imadpt.o_proj.weight", None),
    "img_fc.weight": ("model.img_fc.weight", None),
    "img_fc.bias": ("model.img_fc.bias", None),
}


def vllm_module_parameters(qkv_bias: bool, has_bias: bool) -> set[str]:
    """The parameters of the vLLM draft module (vispec_vllm/draft_model.py) for these dims."""
    params = {"model.embed_tokens.weight", "model.fc.weight", "model.img_fc.weight",
              "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.post_attention_layernorm.weight",
              "imadpt.q", "imadpt.k_proj.weight", "imadpt.v_proj.weight", "imadpt.o_proj.weight"}
    if qkv_bias:
        params |= {"model.layers.0.self_attn.qkv_proj.bias", "imadpt.k_proj.bias", "imadpt.v_proj.bias"}
    if has_bias:
        params |= {"model.fc.bias", "model.img_fc.bias"}
    return params


def module_parameter_of(name: str) -> tuple[str, str | int | None]:
    """(parameter, shard id) the draft's loader (vLLM's WeightsMapper) gives a published name."""
    [(parameter, tensor)] = list(ViSpecDraftModel.hf_to_vllm_mapper.apply([(name, torch.zeros(1))]))
    return parameter, getattr(tensor, "shard_id", None)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
def test_every_published_name_lands_on_a_module_parameter(qkv_bias, has_bias):
    dims = DraftDims(128, 4, 32, 256, 512, qkv_bias, has_bias=has_bias)
    mapped = {name: module_parameter_of(name) for name in published_shapes(dims)}
    assert mapped == {name: EXPECTED_MAPPING[name] for name in published_shapes(dims)}
    # Onto: every module parameter is loaded, each fused one from all of its shards.
    assert {param for param, _ in mapped.values()} == vllm_module_parameters(qkv_bias, has_bias)
    shards: dict[str, set] = {}
    for param, shard in mapped.values():
        shards.setdefault(param, set()).add(shard)
    assert shards["model.layers.0.self_attn.qkv_proj.weight"] == {"q", "k", "v"}
    assert shards["model.layers.0.mlp.gate_up_proj.weight"] == {0, 1}


def test_masked_head_size_leaves_room_for_the_mask_channel():
    cpu_sizes = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32.0's CPU attention backend
    assert [masked_head_size(d, cpu_sizes) for d in (32, 64, 128, 200)] == [64, 80, 160, 224]
    assert [masked_head_size(d, None) for d in (32, 128)] == [40, 136]  # any multiple of 8
    with pytest.raises(ValueError, match=r"head_dim 512 leaves no room for the key-mask channel"):
        masked_head_size(512, cpu_sizes)


@pytest.mark.parametrize("keep_image_rows", [False, True])
def test_draft_config_travels_as_one_plain_attribute(keep_image_rows):
    config = ViSpecDraftConfig(num_q=5, head_dim=32, qkv_bias=True, has_bias=False, masked_head_size=64,
                               ignored_weights=("lm_head.weight",), adaptive_schedule=True,
                               keep_image_rows=keep_image_rows)
    hf_config = SimpleNamespace(hidden_size=128)
    assert ViSpecDraftConfig.stored_in(hf_config) is None
    config.store_in(hf_config)
    # Plain values under one attribute: JSON-writable, and it survives the trip to other processes.
    assert set(vars(hf_config)) == {"hidden_size", VISPEC_DRAFT_CONFIG_ATTRIBUTE}
    json.dumps(vars(hf_config))
    assert ViSpecDraftConfig.stored_in(pickle.loads(pickle.dumps(hf_config))) == config
    as_json = SimpleNamespace(**json.loads(json.dumps(vars(hf_config))))  # lists for tuples
    assert ViSpecDraftConfig.stored_in(as_json) == config
    broken = SimpleNamespace(**{VISPEC_DRAFT_CONFIG_ATTRIBUTE: {"num_q": 5}})
    with pytest.raises(ValueError, match=rf"{VISPEC_DRAFT_CONFIG_ATTRIBUTE}.*expected a dict with the keys"):
        ViSpecDraftConfig.stored_in(broken)


def test_family_detection(tiny_models):
    for model_type, family in (("llava", "llama"), ("llava_next", "llama"), ("qwen2_5_vl", "qwen2"),
                               ("qwen2_vl", "qwen2"), ("mllama", None), ("llama", None), ("", None)):
        assert target_family(model_type) == family, model_type
    for model_type, family in (("llama", "llama"), ("qwen2", "qwen2"), ("qwen2_5_vl_text", "qwen2"), ("", "llama")):
        assert draft_family(model_type) == family, model_type
    expected = {"tiny-llava": "llama", "tiny-llava-next": "llama", "tiny-qwen2_5_vl": "qwen2"}
    for target, family in expected.items():
        target_config = json.loads((tiny_models / target / "config.json").read_text())
        draft_config_file = json.loads((tiny_models / f"{target}-vispec" / "config.json").read_text())
        assert target_family(target_config["model_type"]) == family
        assert draft_family(draft_config_file["model_type"]) == family
        assert load_checkpoint_description(str(tiny_models / f"{target}-vispec")).family == family
    assert target_family(json.loads((DEMO_TARGET / "config.json").read_text())["model_type"]) == "llama"


def names_of(directory: Path) -> list[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return list(f.keys())


def test_weight_layout(tiny_models):
    vispec = names_of(tiny_models / "tiny-llava-vispec")
    eagle = [n for n in vispec if not n.startswith(("imadpt.", "img_fc."))]
    assert weight_layout(vispec) == "vispec"
    assert weight_layout(eagle) == "eagle"
    assert weight_layout([n for n in eagle if n != "embed_tokens.weight"]) == "eagle"
    assert weight_layout(eagle + ["lm_head.weight"]) is None  # a draft with its own head: not plain EAGLE
    assert weight_layout(eagle + ["layers.1.mlp.up_proj.weight"]) is None  # two layers
    assert weight_layout(["model." + n for n in eagle] + ["lm_head.weight"]) is None  # a one-layer draft LM
    assert weight_layout([n for n in eagle if n != "fc.weight"]) is None
    # The shipped demo drafts, recognised from their files.
    assert checkpoint_layout(str(DEMO_DRAFTS["eagle"])) == "eagle"
    assert checkpoint_layout(str(DEMO_DRAFTS["vispec"])) == "vispec"
    assert checkpoint_layout(str(DEMO_TARGET)) is None
    for name in ("vispec", "vispec-no-adaptor"):
        checkpoint = load_checkpoint_description(str(DEMO_DRAFTS[name]))
        assert (checkpoint.dims.num_q, checkpoint.dims.has_bias, checkpoint.ignored_weights) == (2, False, ())


# --------------------------------------------------------------------------------------------
# The validator, on small checkpoints edited in tmp_path.

TINY = DraftDims(128, 4, 32, 256, 512, False)


@pytest.fixture
def draft(tmp_path) -> Path:
    out = tmp_path / "draft"
    write_vispec_draft(out, TINY, "llama", torch.randn(512, 128, generator=torch.Generator().manual_seed(0)), seed=0)
    return out


def edit(directory: Path, transform, fmt: str = "safetensors") -> Path:
    weights = transform(load_file(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    if fmt == "safetensors":
        save_file(weights, directory / "model.safetensors")
    else:
        torch.save(weights, directory / "pytorch_model.bin")
    return directory / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings():
    handler = Collect()
    logger = logging.getLogger("vllm.vispec_vllm")  # vLLM's loggers do not propagate to the root
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_valid_draft_describes_itself(draft, warnings):
    checkpoint = load_checkpoint_description(str(draft))
    assert checkpoint.dims == TINY and checkpoint.ignored_weights == ()
    assert checkpoint.family == "llama" and checkpoint.architecture == "EagleViSpecLlamaForCausalLM"
    assert warnings == []
    assert checkpoint.vispec_draft_config((32, 64), adaptive_schedule=True) == ViSpecDraftConfig(
        num_q=2, head_dim=32, qkv_bias=False, has_bias=True, masked_head_size=64, ignored_weights=(),
        adaptive_schedule=True)
    with pytest.raises(ViSpecCheckpointError, match=rf"{draft / 'model.safetensors'}: head_dim 32 leaves no room"):
        checkpoint.vispec_draft_config((16, 32), adaptive_schedule=False)


def write_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_draft_keeping_image_rows_describes_itself(draft, warnings):
    write_config(draft, **{KEEP_IMAGE_ROWS_KEY: True})
    checkpoint = load_checkpoint_description(str(draft))
    assert checkpoint.keep_image_rows and checkpoint.dims == TINY and warnings == []
    assert checkpoint.vispec_draft_config((32, 64), adaptive_schedule=False) == ViSpecDraftConfig(
        num_q=2, head_dim=32, qkv_bias=False, has_bias=True, masked_head_size=64, keep_image_rows=True)
    write_config(draft, **{KEEP_IMAGE_ROWS_KEY: False})
    assert not load_checkpoint_description(str(draft)).keep_image_rows


@pytest.mark.parametrize("value", ["true", 1, None])
def test_a_keep_key_that_is_not_a_boolean_stops(draft, value):
    write_config(draft, **{KEEP_IMAGE_ROWS_KEY: value})
    with pytest.raises(ViSpecCheckpointError, match=rf"{draft / 'config.json'}: {KEEP_IMAGE_ROWS_KEY} is "
                                                    rf"{re.escape(repr(value))}; expected true or false"):
        load_checkpoint_description(str(draft))


def test_one_query_draft_is_accepted(tmp_path, warnings):
    # The EAGLE draft trained with its image rows dropped: an adaptor with only the global query.
    out = tmp_path / "one-query"
    write_vispec_draft(out, TINY, "llama", torch.randn(512, 128, generator=torch.Generator().manual_seed(0)), seed=0,
                       num_q=1)
    checkpoint = load_checkpoint_description(str(out))
    assert checkpoint.dims == DraftDims(128, 4, 32, 256, 512, False, num_q=1) and warnings == []
    assert checkpoint.vispec_draft_config(None, adaptive_schedule=False).num_q == 1
    assert not checkpoint.keep_image_rows


def test_a_draft_without_adaptor_queries_stops(draft):
    weight_file = edit(draft, lambda w: {**w, "imadpt.q": torch.zeros(0, 4, 32)})
    with pytest.raises(ViSpecCheckpointError, match=r"imadpt\.q has num_q=0; the adaptor needs at least 1") as info:
        load_checkpoint_description(str(draft))
    assert str(weight_file) in str(info.value)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_extra_tensors_are_ignored_with_one_warning(draft, warnings, fmt):
    extra = {"lm_head.weight": torch.randn(512, 128), "layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}
    weight_file = edit(draft, lambda w: {**w, **extra}, fmt)
    checkpoint = load_checkpoint_description(str(draft))
    assert checkpoint.ignored_weights == ("layers.0.self_attn.rotary_emb.inv_freq", "lm_head.weight")
    assert checkpoint.dims.num_q == 2 and checkpoint.dims == TINY
    assert len(warnings) == 1
    assert str(weight_file) in warnings[0] and all(name in warnings[0] for name in extra)


@pytest.mark.parametrize("name, value, kind", [
    ("imadpt.q", math.nan, "NaN"),
    ("fc.weight", math.inf, "Inf"),
    ("layers.0.mlp.down_proj.weight", -math.inf, "Inf"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_or_inf_stops_naming_file_and_tensor(draft, name, value, kind, dtype):
    def poison(weights):
        weights = {k: v.to(dtype) for k, v in weights.items()}
        weights[name].view(-1)[3] = value
        return weights

    weight_file = edit(draft, poison)
    with pytest.raises(ViSpecCheckpointError, match=rf"NaN or Inf in draft weights: {name} \(1 {kind}\)") as info:
        load_checkpoint_description(str(draft))
    assert str(weight_file) in str(info.value)


def test_non_finite_values_in_an_ignored_tensor_do_not_stop(draft, warnings):
    edit(draft, lambda w: {**w, "lm_head.weight": torch.full((512, 128), math.nan)})
    assert load_checkpoint_description(str(draft)).ignored_weights == ("lm_head.weight",)
    assert len(warnings) == 1 and "lm_head.weight" in warnings[0]


@pytest.mark.parametrize("transform, message", [
    (lambda w: {k: v for k, v in w.items() if k != "img_fc.bias"}, r"missing weights: img_fc\.bias"),
    (lambda w: {**w, "fc.weight": torch.zeros(128, 128)},
     r"wrong shapes: fc\.weight \[128, 128\] \(expected \[128, 256\]\)"),
    (lambda w: {**w, "imadpt.q": torch.zeros(3, 4, 32), "imadpt.k_proj.weight": torch.zeros(96, 128)},
     r"\(num_q=3\): wrong shapes: imadpt\.k_proj\.weight \[96, 128\] \(expected \[128, 128\]\)"),
], ids=["missing", "wrong-shape", "adaptor-heads"])
def test_missing_or_wrongly_shaped_weights_stop(draft, transform, message):
    weight_file = edit(draft, transform)
    with pytest.raises(ViSpecCheckpointError, match=message) as info:
        load_checkpoint_description(str(draft))
    assert str(weight_file) in str(info.value)


def test_missing_and_wrong_shape_are_reported_together_extras_are_not_errors(draft, warnings):
    def transform(weights):
        weights = {k: v for k, v in weights.items() if k != "fc.bias"}
        weights["img_fc.weight"] = torch.zeros(128, 128)
        weights["lm_head.weight"] = torch.zeros(512, 128)
        return weights

    edit(draft, transform)
    with pytest.raises(ViSpecCheckpointError, match=r"missing weights: fc\.bias \| wrong shapes: img_fc\.weight") \
            as info:
        load_checkpoint_description(str(draft))
    assert "lm_head" not in str(info.value)


def test_unreadable_or_absent_checkpoints(draft, tmp_path):
    data = (draft / "model.safetensors").read_bytes()
    (draft / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ViSpecCheckpointError, match="unreadable safetensors file"):
        load_checkpoint_description(str(draft))
    with pytest.raises(ViSpecCheckpointError, match="not a local directory"):
        load_checkpoint_description("/nonexistent/ViSpec-draft")
    empty = tmp_path / "empty"
    shutil.copytree(draft, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(ViSpecCheckpointError, match="no model.safetensors or pytorch_model.bin"):
        load_checkpoint_description(str(empty))

"""The ViSpec draft checkpoint format (that of the published ViSpec drafts), written down once.

A ViSpec draft directory holds `config.json` (a plain one-layer Llama or Qwen2 config) and
`model.safetensors` or `pytorch_model.bin`. This module says, as data and small pure functions:

- the families (Llama drafts serve LLaVA targets, Qwen2 drafts serve Qwen2.5-VL targets), how to
  tell a family from a target's or a draft's `model_type`, and the architectures this plugin
  registers for them;
- the published weight names and shapes, as functions of the draft's dims: the EAGLE part (what a
  plain EAGLE / stage-1 draft holds) and the ViSpec part (`imadpt.*`, the vision adaptor, and
  `img_fc.*`, the global-feature fusion);
- which layout a set of weight names is in (ViSpec, plain EAGLE, or neither);
- the draft `config.json` fields;
- how each published name maps to a parameter of the vLLM draft module (`model.` prefix, q/k/v
  and gate/up stacked), the way vLLM's own EAGLE Llama maps its checkpoints.

No vLLM import: the checkpoint validator, the vLLM draft model, training and the tiny-model
factory all read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass

# Families, by the draft config's model_type.
LLAMA, QWEN2 = "llama", "qwen2"
FAMILIES = (LLAMA, QWEN2)
# Registered draft architectures, by family. The "Eagle" prefix keeps vLLM's EAGLEConfig from
# renaming them (it prefixes any other name).
VISPEC_ARCHITECTURES = {LLAMA: "EagleViSpecLlamaForCausalLM", QWEN2: "EagleViSpecQwen2ForCausalLM"}
# Published Qwen drafts have q/k/v biases (config key `qkv_bias`), Llama drafts do not.
FAMILY_QKV_BIAS = {LLAMA: False, QWEN2: True}

CONFIG_FILE = "config.json"
# Published drafts ship one of these (the reference loader tries .bin first; a directory holds
# one format or identical copies).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

VISPEC_PREFIXES = ("imadpt.", "img_fc.")
EAGLE_FC = "fc.weight"
EAGLE_LAYER_PREFIX = "layers.0."


def target_family(model_type: str) -> str | None:
    """The draft family a target needs, from the target config's model_type (None: not a target
    family ViSpec drafts exist for)."""
    if model_type.startswith("qwen"):  # qwen2_5_vl, qwen2_vl
        return QWEN2
    if model_type.startswith("llava"):  # llava, llava_next
        return LLAMA
    return None


def draft_family(model_type: str) -> str:
    """The family of a draft (or of a language model's text config) from its model_type; the
    published LLaVA drafts say "llama", the Qwen ones "qwen2"; absent means llama."""
    return QWEN2 if model_type.startswith("qwen") else LLAMA


@dataclass(frozen=True)
class DraftDims:
    """What the published parameter shapes are functions of.

    The first six come from the target's language model; the rest from the checkpoint:
    num_q is `imadpt.q.shape[0]` (not in the config), has_bias the config's optional `bias` key
    (fc / img_fc bias, absent means True), has_embed_tokens whether the draft ships its own copy
    of the target's input embedding.
    """

    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool
    _: KW_ONLY
    num_q: int = 2
    has_bias: bool = True
    has_embed_tokens: bool = True


def eagle_shapes(dims: DraftDims) -> dict[str, tuple[int, ...]]:
    """The EAGLE part: input embedding, decoder layer 0 (no input_layernorm) and fc, in the
    published registration order."""
    h, heads = dims.hidden_size, dims.num_heads * dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if dims.has_embed_tokens:
        shapes["embed_tokens.weight"] = (dims.vocab_size, h)
    for proj in ("q_proj", "k_proj", "v_proj"):
        shapes[f"layers.0.self_attn.{proj}.weight"] = (heads, h)
        if dims.qkv_bias:
            shapes[f"layers.0.self_attn.{proj}.bias"] = (heads,)
    shapes["layers.0.self_attn.o_proj.weight"] = (h, heads)
    shapes["layers.0.mlp.gate_proj.weight"] = (dims.intermediate_size, h)
    shapes["layers.0.mlp.up_proj.weight"] = (dims.intermediate_size, h)
    shapes["layers.0.mlp.down_proj.weight"] = (h, dims.intermediate_size)
    shapes["layers.0.post_attention_layernorm.weight"] = (h,)
    shapes["fc.weight"] = (h, 2 * h)  # input [token embedding ; fused hidden]
    if dims.has_bias:
        shapes["fc.bias"] = (h,)
    return shapes


def vispec_shapes(dims: DraftDims) -> dict[str, tuple[int, ...]]:
    """The ViSpec part: the vision adaptor (num_q learned queries, k/v/o projections) and img_fc."""
    h, heads = dims.hidden_size, dims.num_heads * dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {"imadpt.q": (dims.num_q, dims.num_heads, dims.head_dim)}
    for proj in ("k_proj", "v_proj"):
        shapes[f"imadpt.{proj}.weight"] = (heads, h)
        if dims.qkv_bias:
            shapes[f"imadpt.{proj}.bias"] = (heads,)
    shapes["imadpt.o_proj.weight"] = (h, heads)
    shapes["img_fc.weight"] = (h, 2 * h)  # input [target hidden ; global image feature]
    if dims.has_bias:
        shapes["img_fc.bias"] = (h,)
    return shapes


def published_shapes(dims: DraftDims) -> dict[str, tuple[int, ...]]:
    """Every weight of a ViSpec draft, name -> shape, in the published order."""
    return {**eagle_shapes(dims), **vispec_shapes(dims)}


def weight_layout(names: Iterable[str]) -> str | None:
    """"vispec" (adaptor and img_fc present), "eagle" (a plain EAGLE draft: fc.weight and decoder
    layer 0 only, no lm_head, no full-model `model.` names) or None (neither, e.g. a draft LM)."""
    names = set(names)
    if all(any(n.startswith(prefix) for n in names) for prefix in VISPEC_PREFIXES):
        return "vispec"
    layer_names = [n for n in names if n.startswith("layers.")]
    is_eagle = (EAGLE_FC in names and bool(layer_names) and all(n.startswith(EAGLE_LAYER_PREFIX) for n in layer_names)
                and not any(n.startswith(("lm_head.", "model.", *VISPEC_PREFIXES)) for n in names))
    return "eagle" if is_eagle else None


def draft_config(dims: DraftDims, family: str, max_position_embeddings: int = 4096) -> dict:
    """config.json of a ViSpec draft, with the keys of the published checkpoints (the optional
    `bias` key only when fc / img_fc have no bias)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown draft family {family!r}; expected one of {FAMILIES}")
    if dims.qkv_bias != FAMILY_QKV_BIAS[family]:
        raise ValueError(f"a {family} draft has qkv_bias={FAMILY_QKV_BIAS[family]}, dims say {dims.qkv_bias}")
    config = dict(
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        hidden_size=dims.hidden_size,
        initializer_range=0.02,
        intermediate_size=dims.intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_attention_heads=dims.num_heads,
        num_hidden_layers=1,
        num_key_value_heads=dims.num_heads,  # plain MHA in every published draft, also for Qwen
        pretraining_tp=1,
        rope_scaling=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
        transformers_version="4.51.3",
        use_cache=True,
        vocab_size=dims.vocab_size,
    )
    if family == QWEN2:
        config.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            qkv_bias=True,
            attention_dropout=0.0,
            max_window_layers=1,
            sliding_window=max_position_embeddings,
            use_sliding_window=False,
        )
    else:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, pad_token_id=0)
    if not dims.has_bias:
        config["bias"] = False
    return dict(sorted(config.items()))


@dataclass(frozen=True)
class ParameterNameMapping:
    """Published weight name -> (vLLM module parameter name, shard id), declaratively, as vLLM's
    `WeightsMapper` and the `stacked_params_mapping` of its llama.py do it.

    Names starting with one of `unprefixed` keep their name; every other name gets `prefix` (the
    EAGLE layout nests embed_tokens, fc, img_fc and the layer under `model.`). A name holding one
    of the `stacked` parts loads into that shard of the fused parameter.
    """

    prefix: str
    unprefixed: tuple[str, ...]
    stacked: tuple[tuple[str, str, str | int], ...]  # (fused parameter, published part, shard id)

    def map(self, name: str) -> tuple[str, str | int | None]:
        if name.startswith(self.unprefixed):
            return name, None
        name = self.prefix + name
        for fused, part, shard in self.stacked:
            if part in name:
                return name.replace(part, fused), shard
        return name, None


# The adaptor sits at the draft module's top level and keeps unfused k/v projections.
PARAMETER_NAME_MAPPING = ParameterNameMapping(
    prefix="model.",
    unprefixed=("imadpt.",),
    stacked=(
        (".qkv_proj", ".q_proj", "q"),
        (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0),
        (".gate_up_proj", ".up_proj", 1),
    ),
)

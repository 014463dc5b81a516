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
- the draft `config.json` fields, and the one this project adds: `vispec_keep_image_rows`
  (`KEEP_IMAGE_ROWS_KEY`), written only for drafts trained with every image row kept;
- how each published name maps to a parameter of the vLLM draft module (`model.` prefix, q/k/v
  and gate/up stacked), as the tables vLLM's `WeightsMapper` takes;
- what a served draft is built from beyond its config.json (`ViSpecDraftConfig`: num_q, head_dim,
  biases, the key-mask head size, the ignored tensors, whether image rows are kept), and the one
  draft-config attribute that carries it from the checkpoint validator to the vLLM draft module.

No vLLM import: the checkpoint validator, the vLLM draft model, training and the tiny-model
factory all read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, fields

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

# Optional draft config.json key (not in the published checkpoints; absent means false): true for
# a draft trained with no image row dropped (the `keep_image_rows` training ablation). Such a draft
# is served under the row plan with `keep_image_rows` (vispec_vllm/row_plan.py): the image rows
# ViSpec drops stay in the draft's attention as text rows that fuse no g; the compressed rows and
# the g of later rows are ViSpec's.
KEEP_IMAGE_ROWS_KEY = "vispec_keep_image_rows"


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


def draft_config(dims: DraftDims, family: str, max_position_embeddings: int = 4096,
                 keep_image_rows: bool = False) -> dict:
    """config.json of a ViSpec draft, with the keys of the published checkpoints (the optional
    `bias` key only when fc / img_fc have no bias; KEEP_IMAGE_ROWS_KEY only when image rows are kept)."""
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
    if keep_image_rows:
        config[KEEP_IMAGE_ROWS_KEY] = True
    return dict(sorted(config.items()))


def keeps_image_rows(config: Mapping[str, object]) -> bool:
    """Whether a draft config.json says the draft keeps every image row (KEEP_IMAGE_ROWS_KEY; absent,
    as in every published checkpoint, means no). Anything but a JSON boolean is refused."""
    value = config.get(KEEP_IMAGE_ROWS_KEY, False)
    if not isinstance(value, bool):
        raise ValueError(f"{KEEP_IMAGE_ROWS_KEY} is {value!r}; expected true or false")
    return value


# How each published name maps to a parameter of the vLLM draft module, as vLLM's `WeightsMapper`
# (model_executor/models/utils.py) takes it and as its llama.py / llama_eagle.py map their
# checkpoints: first layer 0's q/k/v and gate/up parts into the fused `qkv_proj` / `gate_up_proj`
# (with these shard ids), then the EAGLE part under `model.`. The adaptor (`imadpt.`) keeps its
# published names: it sits at the module's top level with unfused k/v projections, so the stacked
# parts name layer 0's sub-modules in full.
STACKED_PARAMETER_PARTS: dict[str, tuple[str, str | int]] = {
    ".self_attn.q_proj": (".self_attn.qkv_proj", "q"),
    ".self_attn.k_proj": (".self_attn.qkv_proj", "k"),
    ".self_attn.v_proj": (".self_attn.qkv_proj", "v"),
    ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
    ".mlp.up_proj": (".mlp.gate_up_proj", 1),
}
MODULE_NAME_PREFIXES: dict[str, str] = {
    "embed_tokens.": "model.embed_tokens.",
    "layers.": "model.layers.",
    "fc.": "model.fc.",
    "img_fc.": "model.img_fc.",
}


def masked_head_size(head_dim: int, supported_head_sizes: Sequence[int] | None) -> int:
    """The head size the draft's attention runs with: head_dim channels plus the key-mask channel
    (docs/method.md §6.1), padded to the smallest size the attention backend supports (None: any
    multiple of 8, as FlashAttention and friends take)."""
    if supported_head_sizes is None:
        return head_dim + 8
    larger = [size for size in supported_head_sizes if size > head_dim]
    if not larger:
        raise ValueError(f"head_dim {head_dim} leaves no room for the key-mask channel: the attention backend "
                         f"supports head sizes {sorted(supported_head_sizes)}")
    return min(larger)


# The one attribute of the draft's hf_config that carries a ViSpecDraftConfig, as a dict of plain
# values: the config travels to the engine-core and worker processes, and vLLM writes hf_config
# out as JSON.
VISPEC_DRAFT_CONFIG_ATTRIBUTE = "vispec_draft"


@dataclass(frozen=True)
class ViSpecDraftConfig:
    """What a served ViSpec draft is built from beyond its plain config.json: decided once, when the
    checkpoint is validated (vispec_vllm/checkpoint.py, called by patches/speculative_config.py),
    carried on the draft's hf_config and read back once by the vLLM draft module.

    num_q:             the adaptor's learned queries (`imadpt.q.shape[0]`; not in config.json)
    head_dim:          the head size of layer 0's attention and of the adaptor (`imadpt.q.shape[2]`)
    qkv_bias:          q/k/v projections (the adaptor's k/v too) have biases (Qwen2 drafts)
    has_bias:          fc and img_fc have biases (config.json's optional `bias`, absent means True)
    masked_head_size:  the head size the attention runs with, key-mask channel included (the mask
                       layout: channel `head_dim` holds the mask; see `masked_head_size`)
    ignored_weights:   tensors of the checkpoint the draft does not use; the loader skips them
    adaptive_schedule: the scheduler keeps the draft length in step with the measured acceptance
                       (patches/acceptance_feedback.py)
    keep_image_rows:   no image row is dropped: the rows are planned with `keep_image_rows`
                       (config.json's optional KEEP_IMAGE_ROWS_KEY, absent means False)
    """

    num_q: int
    head_dim: int
    qkv_bias: bool
    has_bias: bool
    masked_head_size: int
    ignored_weights: tuple[str, ...] = ()
    adaptive_schedule: bool = False
    keep_image_rows: bool = False

    def store_in(self, hf_config: object) -> None:
        setattr(hf_config, VISPEC_DRAFT_CONFIG_ATTRIBUTE, asdict(self))

    @classmethod
    def stored_in(cls, hf_config: object) -> ViSpecDraftConfig | None:
        """The settings `store_in` put on this config, or None (not a ViSpec draft's config)."""
        stored = getattr(hf_config, VISPEC_DRAFT_CONFIG_ATTRIBUTE, None)
        if stored is None:
            return None
        expected = {f.name for f in fields(cls)}
        if not isinstance(stored, dict) or set(stored) != expected:
            raise ValueError(f"draft config attribute {VISPEC_DRAFT_CONFIG_ATTRIBUTE!r} is {stored!r}; expected a dict "
                             f"with the keys {sorted(expected)}")
        return cls(**{**stored, "ignored_weights": tuple(stored["ignored_weights"])})

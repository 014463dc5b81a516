"""Recognise, validate and describe published ViSpec draft checkpoints.

A published ViSpec draft (`JLKang/ViSpec-*`) is `config.json` (a plain Llama or Qwen2 config with
one layer) plus `model.safetensors` or `pytorch_model.bin`. Nothing in the config says "ViSpec";
the weights do: `imadpt.*` (the vision adaptor) and `img_fc.*` (the global-feature fusion).
`num_q` is not stored either; it is `imadpt.q.shape[0]`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("vllm.vispec_vllm")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Registered draft architectures, by the family of the checkpoint's config.
# The "Eagle" prefix keeps vLLM's EAGLEConfig from renaming them (it prefixes any other name).
VISPEC_ARCHITECTURES = {"llama": "EagleViSpecLlamaForCausalLM", "qwen2": "EagleViSpecQwen2ForCausalLM"}


class ViSpecCheckpointError(ValueError):
    """A ViSpec draft checkpoint that cannot serve: names the file and what is wrong."""


@dataclass(frozen=True)
class ViSpecCheckpoint:
    directory: Path
    weight_file: Path
    family: str  # "llama" (LLaVA targets) or "qwen2" (Qwen2.5-VL targets)
    hidden_size: int
    vocab_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    num_q: int
    qkv_bias: bool
    has_bias: bool  # fc / img_fc bias ("bias" config key, default True)
    has_embed_tokens: bool

    @property
    def architecture(self) -> str:
        return VISPEC_ARCHITECTURES[self.family]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The published state-dict names and shapes (vispec-method.md §2.3)."""
        h, nh, hd, inter, v, q = (self.hidden_size, self.num_heads, self.head_dim, self.intermediate_size,
                                  self.vocab_size, self.num_q)
        shapes: dict[str, tuple[int, ...]] = {}
        if self.has_embed_tokens:
            shapes["embed_tokens.weight"] = (v, h)
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[f"layers.0.self_attn.{proj}.weight"] = (nh * hd, h)
            if self.qkv_bias:
                shapes[f"layers.0.self_attn.{proj}.bias"] = (nh * hd,)
        shapes["layers.0.self_attn.o_proj.weight"] = (h, nh * hd)
        shapes["layers.0.mlp.gate_proj.weight"] = (inter, h)
        shapes["layers.0.mlp.up_proj.weight"] = (inter, h)
        shapes["layers.0.mlp.down_proj.weight"] = (h, inter)
        shapes["layers.0.post_attention_layernorm.weight"] = (h,)
        for name in ("fc", "img_fc"):
            shapes[f"{name}.weight"] = (h, 2 * h)
            if self.has_bias:
                shapes[f"{name}.bias"] = (h,)
        shapes["imadpt.q"] = (q, nh, hd)
        for proj in ("k_proj", "v_proj"):
            shapes[f"imadpt.{proj}.weight"] = (nh * hd, h)
            if self.qkv_bias:
                shapes[f"imadpt.{proj}.bias"] = (nh * hd,)
        shapes["imadpt.o_proj.weight"] = (h, nh * hd)
        return shapes


def resolve_local_dir(model: str) -> Path | None:
    """A local directory, or a hub id: from the local HF cache, else downloaded (as vLLM itself
    would download the draft) unless the hub is unreachable or HF_HUB_OFFLINE is set."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        return None
    from huggingface_hub import snapshot_download

    for local_files_only in (True, False):
        try:
            return Path(snapshot_download(model, local_files_only=local_files_only,
                                          allow_patterns=["*.json", "*.safetensors", "*.bin"]))
        except Exception:  # not cached / offline / unreachable / not a hub id
            continue
    return None


def _weight_file(directory: Path) -> Path | None:
    # Published drafts ship model.safetensors or pytorch_model.bin (the reference tries .bin first;
    # a directory holds one format or identical copies).
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def read_weight_shapes(weight_file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes, without loading tensors where the format allows."""
    if weight_file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(weight_file, "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:
            raise ViSpecCheckpointError(f"{weight_file}: unreadable safetensors file ({err})") from err
    import torch

    try:
        state = torch.load(weight_file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise ViSpecCheckpointError(f"{weight_file}: unreadable PyTorch weights file ({err})") from err
    return {k: tuple(v.shape) for k, v in state.items()}


def looks_like_vispec(model: str | None) -> bool:
    """True when `model` resolves to a checkpoint whose weights carry a ViSpec adaptor."""
    if not model:
        return False
    directory = resolve_local_dir(model)
    weight_file = directory and _weight_file(directory)
    if not weight_file:
        return False
    try:
        names = read_weight_shapes(weight_file)
    except ViSpecCheckpointError:
        return True  # a ViSpec-named but broken file is still ours to report clearly
    return any(k.startswith("imadpt.") for k in names) and any(k.startswith("img_fc.") for k in names)


def load_checkpoint_description(model: str) -> ViSpecCheckpoint:
    """Read config.json and the weight names once; validate them against the published format."""
    directory = resolve_local_dir(model)
    if directory is None:
        raise ViSpecCheckpointError(f"{model}: not a local directory nor a checkpoint in the local HF cache")
    config_file = directory / "config.json"
    weight_file = _weight_file(directory)
    if weight_file is None:
        raise ViSpecCheckpointError(f"{directory}: no {' or '.join(WEIGHT_FILES)}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ViSpecCheckpointError(f"{config_file}: unreadable draft config ({err})") from err
    shapes = read_weight_shapes(weight_file)

    if "imadpt.q" not in shapes or len(shapes["imadpt.q"]) != 3:
        raise ViSpecCheckpointError(
            f"{weight_file}: missing or malformed 'imadpt.q' (expected [num_q, heads, head_dim])")
    num_q, num_heads, head_dim = shapes["imadpt.q"]
    model_type = config.get("model_type", "llama")
    family = "qwen2" if model_type.startswith("qwen") else "llama"
    hidden_size = int(config["hidden_size"])
    if config.get("num_hidden_layers", 1) != 1:
        raise ViSpecCheckpointError(f"{config_file}: num_hidden_layers is {config['num_hidden_layers']}, "
                                    "ViSpec drafts have exactly 1")
    checkpoint = ViSpecCheckpoint(
        directory=directory,
        weight_file=weight_file,
        family=family,
        hidden_size=hidden_size,
        vocab_size=int(config["vocab_size"]),
        num_heads=num_heads,
        head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        num_q=num_q,
        qkv_bias=bool(config.get("qkv_bias", False)),
        has_bias=bool(config.get("bias", True)),
        has_embed_tokens="embed_tokens.weight" in shapes,
    )
    if num_heads != config.get("num_attention_heads", num_heads):
        raise ViSpecCheckpointError(
            f"{weight_file}: imadpt.q has {num_heads} heads but {config_file} says "
            f"num_attention_heads={config['num_attention_heads']}")
    if num_q < 2:
        raise ViSpecCheckpointError(f"{weight_file}: imadpt.q has num_q={num_q}; ViSpec needs at least 2 "
                                    "(compressed tokens plus the global image vector)")
    expected = checkpoint.expected_shapes()
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k} {list(shapes[k])} (expected {list(expected[k])})"
                   for k in set(expected) & set(shapes) if shapes[k] != expected[k])
    problems = []
    if missing:
        problems.append("missing weights: " + ", ".join(missing))
    if extra:
        problems.append("unexpected weights: " + ", ".join(extra))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ViSpecCheckpointError(f"{weight_file}: not a valid ViSpec draft for its config.json "
                                    f"(num_q={num_q}): " + " | ".join(problems))
    if not checkpoint.has_embed_tokens:
        logger.warning("%s has no embed_tokens.weight; the draft will use the target's input embedding",
                       weight_file)
    return checkpoint


def validate_against_target(checkpoint: ViSpecCheckpoint, target_hidden_size: int, target_vocab_size: int,
                            target_family: str | None) -> None:
    """Fail before any KV memory is taken when the draft cannot belong to this target."""
    if checkpoint.hidden_size != target_hidden_size:
        raise ViSpecCheckpointError(
            f"{checkpoint.weight_file}: draft hidden size {checkpoint.hidden_size} does not match the target's "
            f"hidden size {target_hidden_size}")
    if checkpoint.vocab_size != target_vocab_size:
        raise ViSpecCheckpointError(
            f"{checkpoint.weight_file}: draft vocab size {checkpoint.vocab_size} does not match the target's "
            f"vocab size {target_vocab_size}")
    if target_family is not None and target_family != checkpoint.family:
        raise ViSpecCheckpointError(
            f"{checkpoint.weight_file}: a {checkpoint.family} ViSpec draft cannot serve a {target_family} target "
            "(LLaVA targets take Llama drafts, Qwen2.5-VL targets take Qwen2 drafts)")

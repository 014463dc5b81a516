"""Recognise, validate and describe published ViSpec draft checkpoints.

A published ViSpec draft (`JLKang/ViSpec-*`) is `config.json` (a plain Llama or Qwen2 config with
one layer) plus `model.safetensors` or `pytorch_model.bin`. Nothing in the config says "ViSpec";
the weights do: `imadpt.*` (the vision adaptor) and `img_fc.*` (the global-feature fusion).
`num_q` is not stored either; it is `imadpt.q.shape[0]` (1 is accepted: no compressed token, every
image row dropped, as the EAGLE draft trained with its image rows dropped is written). The format
itself (names, shapes, families, the optional `vispec_keep_image_rows` key) is written down in
vispec_vllm/checkpoint_format.py; this module reads files against it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vispec_vllm.checkpoint_format import (
    CONFIG_FILE,
    VISPEC_ARCHITECTURES,
    WEIGHT_FILES,
    DraftDims,
    ViSpecDraftConfig,
    draft_family,
    keeps_image_rows,
    masked_head_size,
    published_shapes,
    weight_layout,
)

logger = logging.getLogger("vllm.vispec_vllm")


class ViSpecCheckpointError(ValueError):
    """A ViSpec draft checkpoint that cannot serve: names the file and what is wrong."""


@dataclass(frozen=True)
class ViSpecCheckpoint:
    directory: Path
    weight_file: Path
    family: str  # "llama" (LLaVA targets) or "qwen2" (Qwen2.5-VL targets)
    dims: DraftDims  # what the published shapes are functions of, num_q included
    # Tensors in the file that the draft does not use (a leftover lm_head, a training buffer):
    # the loader skips exactly these.
    ignored_weights: tuple[str, ...] = ()
    # config.json's optional KEEP_IMAGE_ROWS_KEY: no image row is dropped (a training ablation).
    keep_image_rows: bool = False

    @property
    def architecture(self) -> str:
        return VISPEC_ARCHITECTURES[self.family]

    def vispec_draft_config(self, supported_head_sizes: Sequence[int] | None,
                            adaptive_schedule: bool) -> ViSpecDraftConfig:
        """What the vLLM draft module is built from, on an attention backend that takes
        `supported_head_sizes` (None: any multiple of 8)."""
        try:
            head_size = masked_head_size(self.dims.head_dim, supported_head_sizes)
        except ValueError as err:
            raise ViSpecCheckpointError(f"{self.weight_file}: {err}") from err
        return ViSpecDraftConfig(num_q=self.dims.num_q, head_dim=self.dims.head_dim, qkv_bias=self.dims.qkv_bias,
                                 has_bias=self.dims.has_bias, masked_head_size=head_size,
                                 ignored_weights=self.ignored_weights, adaptive_schedule=adaptive_schedule,
                                 keep_image_rows=self.keep_image_rows)


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


def checkpoint_layout(model: str | None) -> str | None:
    """"vispec", "eagle" (a plain EAGLE draft) or None, from the weight names of the checkpoint
    `model` resolves to (see checkpoint_format.weight_layout)."""
    if not model:
        return None
    directory = resolve_local_dir(model)
    weight_file = directory and _weight_file(directory)
    if not weight_file:
        return None
    try:
        names = read_weight_shapes(weight_file)
    except ViSpecCheckpointError:
        return "vispec"  # a ViSpec-named but broken file is still ours to report clearly
    return weight_layout(names)


def find_non_finite(weight_file: Path, names: list[str]) -> list[str]:
    """The named tensors holding NaN or Inf, as "name (n NaN, m Inf)"; one tensor in memory at a time
    for safetensors files."""
    import torch

    def problem(name: str, tensor: torch.Tensor) -> str | None:
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            return None
        counts = [f"{int(count)} {kind}" for kind, count in
                  (("NaN", torch.isnan(tensor).sum()), ("Inf", torch.isinf(tensor).sum())) if count]
        return f"{name} ({', '.join(counts)})"

    if weight_file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(weight_file, "pt") as f:
            found = [problem(name, f.get_tensor(name)) for name in names]
    else:
        state = torch.load(weight_file, map_location="cpu", mmap=True, weights_only=True)
        found = [problem(name, state[name]) for name in names]
    return [p for p in found if p]


def load_checkpoint_description(model: str) -> ViSpecCheckpoint:
    """Read config.json and the weights once; validate them against the published format.

    Missing or wrongly shaped weights and NaN / Inf values stop start-up; tensors the draft does not
    use are listed in one warning and skipped by the loader.
    """
    directory = resolve_local_dir(model)
    if directory is None:
        raise ViSpecCheckpointError(f"{model}: not a local directory nor a checkpoint in the local HF cache")
    config_file = directory / CONFIG_FILE
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
    if config.get("num_hidden_layers", 1) != 1:
        raise ViSpecCheckpointError(f"{config_file}: num_hidden_layers is {config['num_hidden_layers']}, "
                                    "ViSpec drafts have exactly 1")
    if num_heads != config.get("num_attention_heads", num_heads):
        raise ViSpecCheckpointError(
            f"{weight_file}: imadpt.q has {num_heads} heads but {config_file} says "
            f"num_attention_heads={config['num_attention_heads']}")
    if num_q < 1:
        raise ViSpecCheckpointError(f"{weight_file}: imadpt.q has num_q={num_q}; the adaptor needs at least 1 "
                                    "query (its last is the global image vector)")
    try:
        keep_image_rows = keeps_image_rows(config)
    except ValueError as err:
        raise ViSpecCheckpointError(f"{config_file}: {err}") from err
    dims = DraftDims(int(config["hidden_size"]), num_heads, head_dim, int(config["intermediate_size"]),
                     int(config["vocab_size"]), bool(config.get("qkv_bias", False)), num_q=num_q,
                     has_bias=bool(config.get("bias", True)), has_embed_tokens="embed_tokens.weight" in shapes)
    expected = published_shapes(dims)
    missing = sorted(set(expected) - set(shapes))
    ignored = tuple(sorted(set(shapes) - set(expected)))
    wrong = sorted(f"{k} {list(shapes[k])} (expected {list(expected[k])})"
                   for k in set(expected) & set(shapes) if shapes[k] != expected[k])
    problems = []
    if missing:
        problems.append("missing weights: " + ", ".join(missing))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ViSpecCheckpointError(f"{weight_file}: not a valid ViSpec draft for its config.json "
                                    f"(num_q={num_q}): " + " | ".join(problems))
    non_finite = find_non_finite(weight_file, list(expected))
    if non_finite:
        raise ViSpecCheckpointError(f"{weight_file}: NaN or Inf in draft weights: " + "; ".join(non_finite))
    if ignored:
        logger.warning("%s: ignoring %d tensor(s) the ViSpec draft does not use: %s", weight_file, len(ignored),
                       ", ".join(ignored))
    if not dims.has_embed_tokens:
        logger.warning("%s has no embed_tokens.weight; the draft will use the target's input embedding",
                       weight_file)
    return ViSpecCheckpoint(directory=directory, weight_file=weight_file,
                            family=draft_family(config.get("model_type", "llama")), dims=dims,
                            ignored_weights=ignored, keep_image_rows=keep_image_rows)


def validate_against_target(checkpoint: ViSpecCheckpoint, target_hidden_size: int, target_vocab_size: int,
                            target_family: str | None) -> None:
    """Fail before any KV memory is taken when the draft cannot belong to this target."""
    dims = checkpoint.dims
    if dims.hidden_size != target_hidden_size:
        raise ViSpecCheckpointError(
            f"{checkpoint.weight_file}: draft hidden size {dims.hidden_size} does not match the target's "
            f"hidden size {target_hidden_size}")
    if dims.vocab_size != target_vocab_size:
        raise ViSpecCheckpointError(
            f"{checkpoint.weight_file}: draft vocab size {dims.vocab_size} does not match the target's "
            f"vocab size {target_vocab_size}")
    if target_family is not None and target_family != checkpoint.family:
        raise ViSpecCheckpointError(
            f"{checkpoint.weight_file}: a {checkpoint.family} ViSpec draft cannot serve a {target_family} target "
            "(LLaVA targets take Llama drafts, Qwen2.5-VL targets take Qwen2 drafts)")

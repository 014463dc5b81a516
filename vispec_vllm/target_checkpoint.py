"""What a draft needs from a target checkpoint (a Hugging Face vision-language model directory),
read once for training and the tiny-model factory; no vLLM import.

A target directory holds `config.json` (its language model's settings under `text_config`, or at
the top level) and `model.safetensors` or sharded safetensors with `model.safetensors.index.json`.
A draft copies the target's dims and its language model's input embedding, and shares its
`lm_head` (docs/method.md §2.1, §4.2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vispec_vllm.checkpoint_format import CONFIG_FILE, FAMILY_QKV_BIAS, LLAMA, DraftDims, target_family

SINGLE_WEIGHT_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TargetCheckpoint:
    """A target directory and its parsed `config.json`; tensors are read on demand."""

    directory: Path
    config: dict

    @classmethod
    def read(cls, directory: str | Path) -> TargetCheckpoint:
        directory = Path(directory)
        config_file = directory / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; not a target checkpoint directory")
        return cls(directory, json.loads(config_file.read_text()))

    @property
    def text_config(self) -> dict:
        """The language model's settings (a VLM nests them under `text_config`)."""
        return self.config.get("text_config", self.config)

    @property
    def family(self) -> str:
        """The draft family this target needs (checkpoint_format.FAMILIES); a target of another
        model_type gets a Llama draft."""
        return target_family(self.config.get("model_type", "")) or LLAMA

    @property
    def draft_dims(self) -> DraftDims:
        """The dims of a draft for this target (its hidden size, heads, MLP width and vocabulary)."""
        text = self.text_config
        heads = text["num_attention_heads"]
        return DraftDims(text["hidden_size"], heads, text["hidden_size"] // heads, text["intermediate_size"],
                         text["vocab_size"], FAMILY_QKV_BIAS[self.family])

    @property
    def image_token_id(self) -> int | None:
        """The image placeholder token (`image_token_index` in LLaVA configs, `image_token_id` in Qwen's)."""
        return self.config.get("image_token_index", self.config.get("image_token_id"))

    def weight_files(self) -> list[Path]:
        single = self.directory / SINGLE_WEIGHT_FILE
        if single.is_file():
            return [single]
        index = self.directory / SHARD_INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.directory / name for name in sorted(set(weight_map.values()))]
        raise FileNotFoundError(f"{self.directory}: neither {SINGLE_WEIGHT_FILE} nor {SHARD_INDEX_FILE}")

    def _tensor(self, matches: Callable[[str], bool]) -> torch.Tensor | None:
        for weight_file in self.weight_files():
            with safe_open(weight_file, "pt") as f:
                for name in f.keys():
                    if matches(name):
                        return f.get_tensor(name)
        return None

    def input_embedding(self) -> torch.Tensor:
        """The language model's input embedding [vocab, hidden] (not the vision tower's)."""
        embedding = self._tensor(lambda name: name.endswith("embed_tokens.weight") and "vision" not in name)
        if embedding is None:
            raise KeyError(f"{self.directory}: no language-model embed_tokens.weight in its weights")
        return embedding

    def lm_head(self) -> torch.Tensor:
        """The output projection [vocab, hidden]; the input embedding when the two are tied."""
        lm_head = self._tensor(lambda name: name.endswith("lm_head.weight"))
        if lm_head is not None:
            return lm_head
        if self.config.get("tie_word_embeddings", self.text_config.get("tie_word_embeddings", False)):
            return self.input_embedding()
        raise KeyError(f"{self.directory}: no lm_head.weight in its weights, and word embeddings are not tied")

"""Reading what a draft needs from a target checkpoint (vispec_vllm/target_checkpoint.py): dims and
family from config.json, the language model's input embedding (never the vision tower's) and the
lm_head, from one safetensors file or from shards; tied embeddings; clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vispec_vllm.checkpoint_format import LLAMA, QWEN2, DraftDims
from vispec_vllm.target_checkpoint import TargetCheckpoint

EMBED = torch.arange(24.0).view(6, 4)
LM_HEAD = -torch.arange(24.0).view(6, 4)


def write_target(directory, config: dict, weights: dict[str, torch.Tensor], shards: int = 1) -> TargetCheckpoint:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(weights, directory / "model.safetensors")
    else:
        names = sorted(weights)
        weight_map = {}
        for k in range(shards):
            shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: weights[name] for name in names[k::shards]}
            save_file(part, directory / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return TargetCheckpoint.read(directory)


LLAVA = {"model_type": "llava", "image_token_index": 5,
         "text_config": {"hidden_size": 4, "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 6}}


@pytest.mark.parametrize("shards", [1, 2])
def test_llava_target(tmp_path, shards):
    target = write_target(tmp_path, LLAVA, {"model.vision_tower.embeddings.embed_tokens.weight": torch.ones(3, 4),
                                            "model.language_model.embed_tokens.weight": EMBED,
                                            "lm_head.weight": LM_HEAD}, shards)
    assert target.family == LLAMA and target.image_token_id == 5
    assert target.draft_dims == DraftDims(4, 2, 2, 8, 6, False)
    assert torch.equal(target.input_embedding(), EMBED) and torch.equal(target.lm_head(), LM_HEAD)


def test_qwen_target_with_tied_embeddings(tmp_path):
    config = {"model_type": "qwen2_5_vl", "image_token_id": 4, "tie_word_embeddings": True,
              "text_config": {"hidden_size": 4, "num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 6}}
    target = write_target(tmp_path, config, {"model.language_model.embed_tokens.weight": EMBED})
    assert target.family == QWEN2 and target.image_token_id == 4 and target.draft_dims.qkv_bias
    assert torch.equal(target.lm_head(), EMBED)


def test_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TargetCheckpoint.read(tmp_path / "nothing")
    untied = write_target(tmp_path / "untied", LLAVA, {"model.language_model.embed_tokens.weight": EMBED})
    with pytest.raises(KeyError, match="lm_head"):
        untied.lm_head()
    no_embedding = write_target(tmp_path / "vision-only", LLAVA, {"vision_tower.embed_tokens.weight": EMBED})
    with pytest.raises(KeyError, match="embed_tokens"):
        no_embedding.input_embedding()
    (tmp_path / "untied" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        untied.input_embedding()

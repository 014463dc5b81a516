"""The factory's drafts match the published ViSpec checkpoint format.

Expected names and shapes are written here from the reference tables (vispec-method.md §2.2,
§2.3), as functions of the target's dims, not taken from the factory's code.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vispec_vllm.tiny_models import write_tiny_models


def published_keys(H: int, nh: int, hd: int, I: int, V: int, q: int, qkv_bias: bool) -> dict[str, tuple]:  # noqa: E741
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
    return keys


def target_text_dims(target_dir) -> tuple[int, int, int, int, bool]:
    text = json.loads((target_dir / "config.json").read_text())["text_config"]
    return (text["hidden_size"], text["num_attention_heads"], text["intermediate_size"], text["vocab_size"],
            text["model_type"].startswith("qwen"))


@pytest.mark.parametrize("num_q", [2, 5])
def test_drafts_have_published_keys_and_shapes(tmp_path, num_q):
    written = write_tiny_models(tmp_path, num_q=num_q, write_bin=True)
    for target in ("tiny-llava", "tiny-llava-next", "tiny-qwen2_5_vl"):
        H, nh, I, V, is_qwen = target_text_dims(written[target])  # noqa: E741
        draft_dir = written[f"{target}-vispec"]
        expected = published_keys(H, nh, H // nh, I, V, num_q, qkv_bias=is_qwen)
        for weights in (load_file(draft_dir / "model.safetensors"),
                        torch.load(draft_dir / "pytorch_model.bin", weights_only=True)):
            assert {k: tuple(v.shape) for k, v in weights.items()} == expected, target
        config = json.loads((draft_dir / "config.json").read_text())
        assert config["num_hidden_layers"] == 1
        assert config["hidden_size"] == H and config["vocab_size"] == V
        assert config["num_attention_heads"] == config["num_key_value_heads"] == nh
        assert config.get("qkv_bias", False) == is_qwen
        assert config["architectures"] == (["Qwen2ForCausalLM"] if is_qwen else ["LlamaForCausalLM"])
        # The published drafts carry a frozen copy of the target's input embedding.
        target_weights = load_file(written[target] / "model.safetensors")
        target_embed = next(v for k, v in target_weights.items()
                            if k.endswith("embed_tokens.weight") and "vision" not in k)
        assert torch.equal(load_file(draft_dir / "model.safetensors")["embed_tokens.weight"], target_embed)


def test_factory_is_deterministic(tmp_path):
    a = write_tiny_models(tmp_path / "a", seed=3)
    b = write_tiny_models(tmp_path / "b", seed=3)
    for name in a:
        wa, wb = load_file(a[name] / "model.safetensors"), load_file(b[name] / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

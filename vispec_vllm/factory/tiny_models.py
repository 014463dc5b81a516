"""Tiny, offline, deterministic vision-language targets and ViSpec drafts for tests.

`write_tiny_models(out_dir)` writes six model directories:

- targets `tiny-llava` (LLaVA-1.5 layout), `tiny-llava-next` (anyres) and `tiny-qwen2_5_vl`, each
  with a tokenizer, an image processor and a chat template that vLLM's offline API and its OpenAI
  chat endpoint accept with images;
- for each target a ViSpec draft (`<target>-vispec`) in the published ViSpec checkpoint format:
  `config.json` + `model.safetensors` (and `pytorch_model.bin` on request), with the published
  parameter names, shapes as functions of the target's dims, and `num_q` learned adaptor queries.

Dims are chosen for vLLM's CPU backend: text head size 32 (the CPU attention backend supports
32, 64, 80, ... only) and hidden size 128, so a cold vLLM cycle stays around a minute on 2 cores.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from vispec_vllm.checkpoint_format import (
    CONFIG_FILE,
    LLAMA,
    QWEN2,
    WEIGHT_FILES,
    DraftDims,
    draft_config,
    published_shapes,
)
from vispec_vllm.factory.hf_targets import (
    LLAVA_CHAT_TEMPLATE,
    LLAVA_SPECIAL_TOKENS,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_bpe_tokenizer,
    clip_vision_config,
    init_weights,
    llama_text_config,
    save_target,
    seed_everything,
    to_llava_hf_layout,
)
from vispec_vllm.target_checkpoint import TargetCheckpoint

TARGET_NAMES = ("tiny-llava", "tiny-llava-next", "tiny-qwen2_5_vl")
VOCAB_SIZE = 512
TEXT_HIDDEN = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 256
TEXT_LAYERS = 4
MAX_POSITIONS = 4096
TEXT_DIMS = dict(vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_INTERMEDIATE,
                 num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
                 max_position_embeddings=MAX_POSITIONS)

_TOKENIZER_CORPUS = [
    "Describe the image in detail.",
    "A red circle is above a blue square on a white background.",
    "There are three green triangles and one yellow star in the picture.",
    "What colour is the large shape on the left? It is purple.",
    "The small orange square is below the big black circle.",
    "Count the objects: two circles, one square, no triangles.",
    "USER: ASSISTANT: system user assistant",
]


def build_tiny_llava(out: Path, seed: int, next_variant: bool) -> DraftDims:
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    generator = seed_everything(seed)
    tok = build_bpe_tokenizer(_TOKENIZER_CORPUS * 50, LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, "llava",
                              vocab_size=VOCAB_SIZE)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    common = dict(
        text_config=llama_text_config(tok, **TEXT_DIMS),
        vision_config=clip_vision_config(),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    if next_variant:
        pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            chat_template=LLAVA_CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    else:
        config = LlavaConfig(image_seq_length=16, **common)
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            chat_template=LLAVA_CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    init_weights(model, generator)
    model.eval()
    save_target(model, processor, out, to_llava_hf_layout(model.state_dict()))
    return DraftDims(TEXT_HIDDEN, TEXT_HEADS, TEXT_HIDDEN // TEXT_HEADS, TEXT_INTERMEDIATE, VOCAB_SIZE, False)


def build_tiny_qwen2_5_vl(out: Path, seed: int) -> DraftDims:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    generator = seed_everything(seed)
    tok = build_bpe_tokenizer(_TOKENIZER_CORPUS * 50, QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, "qwen",
                              vocab_size=VOCAB_SIZE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    text_config = dict(
        **TEXT_DIMS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
        max_window_layers=TEXT_LAYERS,
    )
    assert sum([4, 6, 6]) == head_dim // 2
    vision_config = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=TEXT_HIDDEN,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    init_weights(model, generator)
    model.eval()
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels),
        tokenizer=tok,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    save_target(model, processor, out)
    return DraftDims(TEXT_HIDDEN, TEXT_HEADS, head_dim, TEXT_INTERMEDIATE, VOCAB_SIZE, True)


def vispec_draft_state_dict(dims: DraftDims, embed_tokens: torch.Tensor,
                            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ViSpec draft weights with the published names and shapes (vispec_vllm/checkpoint_format.py),
    drawn in the published order; embed_tokens is a copy of the target's, as in the published drafts."""
    weights: dict[str, torch.Tensor] = {}
    for name, shape in published_shapes(dims).items():
        if name == "embed_tokens.weight":
            weights[name] = embed_tokens.clone()
        elif name == "imadpt.q":
            weights[name] = torch.randn(shape, generator=generator) * dims.head_dim**-0.5
        elif name.endswith("layernorm.weight"):
            weights[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            weights[name] = torch.randn(shape, generator=generator) * 0.02
        else:  # a linear layer's [out, in] weight
            weights[name] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
    return weights


def write_vispec_draft(
    out: Path,
    dims: DraftDims,
    family: str,  # "llama" or "qwen2" (checkpoint_format.FAMILIES)
    embed_tokens: torch.Tensor,
    seed: int,
    num_q: int = 2,
    write_bin: bool = False,
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed + 1000)
    sd = vispec_draft_state_dict(replace(dims, num_q=num_q), embed_tokens, generator)
    config = draft_config(dims, family, max_position_embeddings=MAX_POSITIONS)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    safetensors_file, bin_file = WEIGHT_FILES
    save_file(sd, out / safetensors_file, metadata={"format": "pt"})
    if write_bin:
        torch.save(sd, out / bin_file)


def write_tiny_models(
    out_dir: str | Path, seed: int = 0, num_q: int = 2, write_bin: bool = False
) -> dict[str, Path]:
    """Write the three tiny targets and their ViSpec drafts; returns name -> directory."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for name in TARGET_NAMES:
        target_dir = out_dir / name
        if name == "tiny-qwen2_5_vl":
            dims, family = build_tiny_qwen2_5_vl(target_dir, seed), QWEN2
        else:
            dims, family = build_tiny_llava(target_dir, seed, next_variant=name == "tiny-llava-next"), LLAMA
        draft_dir = out_dir / f"{name}-vispec"
        embed_tokens = TargetCheckpoint.read(target_dir).input_embedding()
        write_vispec_draft(draft_dir, dims, family, embed_tokens, seed, num_q, write_bin)
        written[name] = target_dir
        written[f"{name}-vispec"] = draft_dir
    return written

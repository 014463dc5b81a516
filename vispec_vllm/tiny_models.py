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
import random
from dataclasses import dataclass
from pathlib import Path

import torch

TARGET_NAMES = ("tiny-llava", "tiny-llava-next", "tiny-qwen2_5_vl")
VOCAB_SIZE = 512
TEXT_HIDDEN = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 256
TEXT_LAYERS = 4
MAX_POSITIONS = 4096

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Chat templates accept both `image` and `image_url` parts, so vLLM's OpenAI endpoint (which
# turns an `image_url` part into an image placeholder) and `LLM.chat` both work.
# LLaVA prompts start with <s>; the template adds it (vLLM's chat path adds no special tokens).
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>"
    "{% elif message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }} {% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TOKENIZER_CORPUS = [
    "Describe the image in detail.",
    "A red circle is above a blue square on a white background.",
    "There are three green triangles and one yellow star in the picture.",
    "What colour is the large shape on the left? It is purple.",
    "The small orange square is below the big black circle.",
    "Count the objects: two circles, one square, no triangles.",
    "USER: ASSISTANT: system user assistant",
]


@dataclass(frozen=True)
class DraftDims:
    """The target dims a ViSpec draft's parameter shapes are functions of."""

    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_bpe_tokenizer(corpus: list[str], special_tokens: list[str], chat_template: str, family: str,
                        vocab_size: int = VOCAB_SIZE, padding_tokens: int = 64, model_max_length: int = MAX_POSITIONS):
    """Byte-level BPE trained offline on `corpus`, leaving at least `padding_tokens` ids that are
    then filled with plain tokens up to `vocab_size`, so every id of the model decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=special_tokens[0] if family == "llava" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - padding_tokens,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab_size

    if family == "llava":
        names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        extra = ["<image>"]
    else:
        names = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        extra = [t for t in QWEN_SPECIAL_TOKENS if t not in names.values()]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=extra,
        chat_template=chat_template,
        model_max_length=model_max_length,
        **names,
    )
    return fast


def _llama_text_config(tok, **overrides) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=TEXT_HIDDEN // TEXT_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )


def _clip_vision_config() -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )


def _init_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Scale-preserving random init, so hidden states and logits are far from ties."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif "norm" in name or name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _to_llava_hf_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.19 saves the CLIP tower as `vision_tower.embeddings.*`, which vLLM 0.32
    rejects; published llava-hf checkpoints (and vLLM) use `vision_tower.vision_model.*`."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("model."):
            key = key[len("model.") :]
            if key.startswith("language_model."):
                key = "language_model.model." + key[len("language_model.") :]
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        if key.startswith("lm_head."):
            key = "language_model." + key
        out[key] = value.contiguous()
    return out


def _save_target(model, processor, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    sd = state_dict if state_dict is not None else {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})


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

    generator = _seed_everything(seed)
    tok = build_bpe_tokenizer(_TOKENIZER_CORPUS * 50, LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, "llava")
    image_token_id = tok.convert_tokens_to_ids("<image>")
    common = dict(
        text_config=_llama_text_config(tok),
        vision_config=_clip_vision_config(),
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
    _init_weights(model, generator)
    model.eval()
    _save_target(model, processor, out, _to_llava_hf_layout(model.state_dict()))
    return DraftDims(TEXT_HIDDEN, TEXT_HEADS, TEXT_HIDDEN // TEXT_HEADS, TEXT_INTERMEDIATE, VOCAB_SIZE, False)


def build_tiny_qwen2_5_vl(out: Path, seed: int) -> DraftDims:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    generator = _seed_everything(seed)
    tok = build_bpe_tokenizer(_TOKENIZER_CORPUS * 50, QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, "qwen")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    text_config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
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
    _init_weights(model, generator)
    model.eval()
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels),
        tokenizer=tok,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    _save_target(model, processor, out)
    return DraftDims(TEXT_HIDDEN, TEXT_HEADS, head_dim, TEXT_INTERMEDIATE, VOCAB_SIZE, True)


def vispec_draft_config(dims: DraftDims, family: str) -> dict:
    """config.json of a ViSpec draft, with the keys of the published checkpoints."""
    config = dict(
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        hidden_size=dims.hidden_size,
        initializer_range=0.02,
        intermediate_size=dims.intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        num_attention_heads=dims.num_heads,
        num_hidden_layers=1,
        num_key_value_heads=dims.num_heads,
        pretraining_tp=1,
        rope_scaling=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
        transformers_version="4.51.3",
        use_cache=True,
        vocab_size=dims.vocab_size,
    )
    if family == "qwen2_5_vl":
        config.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            qkv_bias=True,
            attention_dropout=0.0,
            max_window_layers=1,
            sliding_window=MAX_POSITIONS,
            use_sliding_window=False,
        )
    else:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, pad_token_id=0)
    return dict(sorted(config.items()))


def vispec_draft_state_dict(
    dims: DraftDims, num_q: int, embed_tokens: torch.Tensor, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random ViSpec draft weights with the published names and shapes (reference §2.3)."""
    h, nh, hd, inter = dims.hidden_size, dims.num_heads, dims.head_dim, dims.intermediate_size

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    def bias(n: int) -> torch.Tensor:
        return torch.randn(n, generator=generator) * 0.02

    sd: dict[str, torch.Tensor] = {"embed_tokens.weight": embed_tokens.clone()}
    for proj, out_features in (("q_proj", nh * hd), ("k_proj", nh * hd), ("v_proj", nh * hd)):
        sd[f"layers.0.self_attn.{proj}.weight"] = linear(out_features, h)
        if dims.qkv_bias:
            sd[f"layers.0.self_attn.{proj}.bias"] = bias(out_features)
    sd["layers.0.self_attn.o_proj.weight"] = linear(h, nh * hd)
    sd["layers.0.mlp.gate_proj.weight"] = linear(inter, h)
    sd["layers.0.mlp.up_proj.weight"] = linear(inter, h)
    sd["layers.0.mlp.down_proj.weight"] = linear(h, inter)
    sd["layers.0.post_attention_layernorm.weight"] = torch.ones(h)
    sd["fc.weight"] = linear(h, 2 * h)
    sd["fc.bias"] = bias(h)
    sd["imadpt.q"] = torch.randn(num_q, nh, hd, generator=generator) * hd**-0.5
    for proj in ("k_proj", "v_proj"):
        sd[f"imadpt.{proj}.weight"] = linear(nh * hd, h)
        if dims.qkv_bias:
            sd[f"imadpt.{proj}.bias"] = bias(nh * hd)
    sd["imadpt.o_proj.weight"] = linear(h, nh * hd)
    sd["img_fc.weight"] = linear(h, 2 * h)
    sd["img_fc.bias"] = bias(h)
    return sd


def write_vispec_draft(
    out: Path,
    dims: DraftDims,
    family: str,
    embed_tokens: torch.Tensor,
    seed: int,
    num_q: int = 2,
    write_bin: bool = False,
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed + 1000)
    sd = vispec_draft_state_dict(dims, num_q, embed_tokens, generator)
    (out / "config.json").write_text(json.dumps(vispec_draft_config(dims, family), indent=2) + "\n")
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    if write_bin:
        torch.save(sd, out / "pytorch_model.bin")


def _target_embed_tokens(target_dir: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(target_dir / "model.safetensors", "pt") as f:
        for key in f.keys():
            if key.endswith("embed_tokens.weight") and "vision" not in key:
                return f.get_tensor(key)
    raise KeyError(f"no embed_tokens in {target_dir}")


def write_tiny_models(
    out_dir: str | Path, seed: int = 0, num_q: int = 2, write_bin: bool = False
) -> dict[str, Path]:
    """Write the three tiny targets and their ViSpec drafts; returns name -> directory."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for name in TARGET_NAMES:
        target_dir = out_dir / name
        if name == "tiny-qwen2_5_vl":
            dims, family = build_tiny_qwen2_5_vl(target_dir, seed), "qwen2_5_vl"
        else:
            dims, family = build_tiny_llava(target_dir, seed, next_variant=name == "tiny-llava-next"), "llava"
        draft_dir = out_dir / f"{name}-vispec"
        write_vispec_draft(draft_dir, dims, family, _target_embed_tokens(target_dir), seed, num_q, write_bin)
        written[name] = target_dir
        written[f"{name}-vispec"] = draft_dir
    return written

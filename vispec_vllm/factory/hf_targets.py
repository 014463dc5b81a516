"""Building Hugging Face vision-language targets offline: tokenizers, configs, weights, layout.

Shared by the tiny test-model factory (`vispec_vllm.factory.tiny_models`) and the demo target
(`vispec_vllm.demo.target`). Nothing here is imported by the plugin at serving time.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

DEFAULT_MAX_POSITIONS = 4096

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

def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_bpe_tokenizer(corpus: list[str], special_tokens: list[str], chat_template: str, family: str,
                        vocab_size: int, padding_tokens: int = 64, model_max_length: int = DEFAULT_MAX_POSITIONS):
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


def llama_text_config(tok, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                      num_attention_heads: int, num_key_value_heads: int,
                      max_position_embeddings: int = DEFAULT_MAX_POSITIONS, **overrides) -> dict:
    """A Llama text config for a LLaVA-layout target, with the tokenizer's special ids."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )


def clip_vision_config() -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )


def init_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
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


def to_llava_hf_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def save_target(model, processor, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    sd = state_dict if state_dict is not None else {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})



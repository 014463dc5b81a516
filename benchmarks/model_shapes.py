"""Shapes of the language models inside the ViSpec targets, for the step-time micro-benchmark
and the cost model. Pure Python: it travels to machines where neither vLLM nor this package is
installed.

Sources: the targets' HF configs (Vicuna-7B/13B inside LLaVA-1.5/1.6, Qwen2.5-VL-3B/7B), as
quoted in ../shared/reference/anchors.md section 5 and vispec-method.md section 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class LanguageModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    vocab_size: int
    qkv_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2 + (h + 2 * kv if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate_size + 2 * h

    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    def decoder_params(self) -> int:
        """What one decode step reads: every layer, the final norm and the LM head (the embedding
        lookup reads one row per token)."""
        return self.num_layers * self.layer_params() + self.hidden_size + self.lm_head_params()

    def kv_bytes_per_token_per_layer(self, bytes_per_value: int = 2) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * bytes_per_value

    def draft_layer(self) -> LanguageModelShape:
        """The ViSpec draft's one decoder layer: plain MHA in every released config, also for Qwen."""
        return replace(self, name=f"{self.name}-draft", num_key_value_heads=self.num_attention_heads, num_layers=1)

    def as_dict(self) -> dict:
        return asdict(self)


VICUNA_7B = LanguageModelShape("vicuna-7b", 4096, 11008, 32, 32, 32, 32064)
VICUNA_13B = LanguageModelShape("vicuna-13b", 5120, 13824, 40, 40, 40, 32000)
QWEN2_5_3B = LanguageModelShape("qwen2.5-3b", 2048, 11008, 16, 2, 36, 151936, qkv_bias=True, tie_word_embeddings=True)
QWEN2_5_7B = LanguageModelShape("qwen2.5-7b", 3584, 18944, 28, 4, 28, 152064, qkv_bias=True)


@dataclass(frozen=True)
class TargetShape:
    """A ViSpec target: its language model and a typical image (tokens per image) for the
    request shape used throughout: one image, a short question, an answer of ~256 tokens."""

    name: str
    language_model: LanguageModelShape
    image_tokens: int
    text_tokens: int = 64
    output_tokens: int = 256

    @property
    def decode_context(self) -> int:
        """Context length halfway through the answer."""
        return self.image_tokens + self.text_tokens + self.output_tokens // 2


TARGETS = {
    target.name: target
    for target in (
        TargetShape("llava-1.5-7b", VICUNA_7B, image_tokens=576),
        TargetShape("llava-1.6-7b", VICUNA_7B, image_tokens=2880),  # AnyRes 2x2 + base, the maximum
        TargetShape("llava-1.5-13b", VICUNA_13B, image_tokens=576),
        TargetShape("llava-1.6-13b", VICUNA_13B, image_tokens=2880),
        TargetShape("qwen2.5-vl-3b", QWEN2_5_3B, image_tokens=1024),  # an 896x896 image, 28x28 px per token
        TargetShape("qwen2.5-vl-7b", QWEN2_5_7B, image_tokens=1024),
    )
}

# For smoke tests of the benchmark scripts on a CPU.
TINY_TARGET = TargetShape("tiny", LanguageModelShape("tiny", 64, 128, 4, 2, 2, 256), image_tokens=16, output_tokens=32)

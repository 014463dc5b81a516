"""Shapes of real ViSpec targets, for the benchmarks only: the GPU step-time measurements
(step_times.py) and the cost model's fit and predictions (cost_model.py).

The plugin never needs this catalogue: it reads the served target's shape from the target's own
config (`LanguageModelShape.from_hf_text_config` in vispec_vllm/cost_model.py). Pure Python, like
the cost model, so that step_times.py runs on GPU machines where vLLM is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from vispec_vllm.cost_model import LanguageModelShape

# The language models inside the ViSpec targets (their HF configs).
VICUNA_7B = LanguageModelShape("vicuna-7b", 4096, 11008, 32, 32, 32, 32064)
VICUNA_13B = LanguageModelShape("vicuna-13b", 5120, 13824, 40, 40, 40, 32000)
QWEN2_5_3B = LanguageModelShape("qwen2.5-3b", 2048, 11008, 16, 2, 36, 151936, qkv_bias=True, tie_word_embeddings=True)
QWEN2_5_7B = LanguageModelShape("qwen2.5-7b", 3584, 18944, 28, 4, 28, 152064, qkv_bias=True)


@dataclass(frozen=True)
class TargetShape:
    """A ViSpec target and the request shape used throughout: one image, a short question, an
    answer of `output_tokens`."""

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

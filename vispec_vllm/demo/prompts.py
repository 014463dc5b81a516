"""The demo's prompts: the prompts it hands draft training (`vispec_vllm.training` knows no scene),
and the held-out prompts that tests and benchmarks ask.

A scene module (`vispec_vllm.demo.scenes`, 36 image tokens, or `.rich_scenes`, 576) says which seeds
are for training (`train_seed_stream`) and which are held out (`held_out_seeds`; rich scenes hold
whole layouts out, so no layout of a held-out prompt occurs in training). Each data set draws its
own stream, apart from the target's own training stream (seed 0): draft-training prompts, text-only
reference answers and captions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

from vispec_vllm.demo import scenes as default_scenes
from vispec_vllm.training.data import PromptFactory, ReferenceFactory

# Seeds of the training-seed streams each draft data set draws from (plus the caller's seed).
GENERATED_STREAM = 1_000  # prompts the target answers (`generated` records)
TEXT_STREAM = 2_000  # reference descriptions after a text-only prompt (`text` records)
CAPTION_STREAM = 3_000  # images with their short captions (`captions` records)

TEXT_PROMPT = "Describe a picture of shapes."


class _SeedPrefix:
    """Seed i of a fixed seed sequence, given its first `count` seeds as a function of `count`
    (recomputed, doubling, only when an index lies past what is known)."""

    def __init__(self, first: Callable[[int], list[int]]) -> None:
        self._first = first
        self._seeds: list[int] = []

    def __getitem__(self, index: int) -> int:
        if index < 0:
            raise IndexError(f"seed index must be >= 0, got {index}")
        if index >= len(self._seeds):
            self._seeds = self._first(max(index + 1, 2 * len(self._seeds)))
        return self._seeds[index]


def training_seeds(scenes: ModuleType, stream: int) -> _SeedPrefix:
    """Index i -> the i-th seed of the scene module's training stream `stream`."""

    def first(count: int) -> list[int]:
        seeds = scenes.train_seed_stream(stream)
        return [next(seeds) for _ in range(count)]

    return _SeedPrefix(first)


def held_out_seeds(scenes: ModuleType) -> _SeedPrefix:
    """Index i -> the i-th held-out seed of the scene module (its evaluation set, in order)."""
    return _SeedPrefix(scenes.held_out_seeds)


def with_images(messages: list[dict], images: Sequence) -> list[dict]:
    """Chat messages whose `{"type": "image"}` parts become vLLM `image_pil` parts, in order."""
    remaining = iter(images)
    return [
        {**m, "content": [{"type": "image_pil", "image_pil": next(remaining)} if part == {"type": "image"} else part
                          for part in m["content"]]} if isinstance(m["content"], list) else m
        for m in messages
    ]


def scene_prompt(scene_seed: int, scenes: ModuleType | None = None) -> list[dict]:
    """The describe prompt for one scene, as vLLM chat messages."""
    scenes = scenes or default_scenes
    return with_images(scenes.describe_messages(), [scenes.make_scene(scene_seed).image])


def scene_prompts(seed: int = 0, held_out: bool = False, scenes: ModuleType | None = None) -> PromptFactory:
    """Sample i -> the prompt of draft-training example i (stream `GENERATED_STREAM + seed`), or of
    held-out example i: a describe request, on rich scenes sometimes a comparison of two images."""
    scenes = scenes or default_scenes
    seeds = held_out_seeds(scenes) if held_out else training_seeds(scenes, GENERATED_STREAM + seed)

    def prompt(i: int) -> list[dict]:
        examples, messages = scenes.training_prompt(seeds[i])
        return with_images(messages, [example.image for example in examples])

    return prompt


def reference_texts(seed: int = 0, scenes: ModuleType | None = None) -> ReferenceFactory:
    """Sample i -> a text-only prompt and a training scene's reference description (no image): the
    text data of the `eagle-text` and `eagle-captions` drafts, as EAGLE drafts learn on text
    conversations."""
    scenes = scenes or default_scenes
    seeds = training_seeds(scenes, TEXT_STREAM + seed)
    return lambda i: ([{"role": "user", "content": TEXT_PROMPT}], scenes.make_scene(seeds[i]).description)


def reference_captions(seed: int = 0, scenes: ModuleType | None = None) -> ReferenceFactory:
    """Sample i -> a training scene's describe prompt with its image, and the scene generator's short
    caption (the image-caption fine-tune of the `eagle-captions` draft)."""
    scenes = scenes or default_scenes
    seeds = training_seeds(scenes, CAPTION_STREAM + seed)

    def example(i: int) -> tuple[list[dict], str]:
        scene = scenes.make_scene(seeds[i])
        return with_images(scenes.describe_messages(), [scene.image]), scenes.caption(scene)

    return example

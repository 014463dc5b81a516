"""The prompts the demo hands training, and the held-out ones (vispec_vllm/demo/prompts.py): no
training prompt, reference text or caption comes from a held-out layout; held-out prompts are the
scene module's evaluation set in order (on the 36-token scenes the seeds from HELD_OUT_START, as
always), including two-image comparisons on rich scenes; each data set draws its own seeds, the
same on every call and in any order."""

from __future__ import annotations

from vispec_vllm.demo import rich_scenes, scenes
from vispec_vllm.demo.prompts import (
    CAPTION_STREAM,
    GENERATED_STREAM,
    TEXT_STREAM,
    reference_captions,
    reference_texts,
    scene_prompts,
    training_seeds,
)


def images(prompt: list[dict]) -> list:
    return [part["image_pil"] for part in prompt[0]["content"] if part["type"] == "image_pil"]


def layout_held_out(scene) -> bool:
    return rich_scenes.layout_is_held_out(frozenset(obj.cell for obj in scene.objects))


def test_held_out_prompts_are_the_evaluation_set():
    held_out = scene_prompts(held_out=True)
    for i in (0, 3):
        assert images(held_out(i))[0].tobytes() == scenes.make_scene(scenes.HELD_OUT_START + i).image.tobytes()
    rich = scene_prompts(held_out=True, scenes=rich_scenes)
    prompts = [rich(i) for i in range(48)]
    two_images = [p for p in prompts if len(images(p)) == 2]
    assert 0 < len(two_images) < 48
    for seed, prompt in zip(rich_scenes.held_out_seeds(48), prompts, strict=True):
        examples, _ = rich_scenes.training_prompt(seed)
        assert [image.tobytes() for image in images(prompt)] == [e.image.tobytes() for e in examples]
        assert all(layout_held_out(example) for example in examples)


def test_training_data_never_comes_from_a_held_out_layout():
    for stream in (GENERATED_STREAM, TEXT_STREAM, CAPTION_STREAM):
        seeds = training_seeds(rich_scenes, stream)
        for i in range(40):
            examples, _ = rich_scenes.training_prompt(seeds[i])
            assert not any(layout_held_out(example) for example in examples)
    first_prompt = images(scene_prompts(scenes=rich_scenes)(0))
    assert first_prompt[0].tobytes() == rich_scenes.make_scene(training_seeds(rich_scenes, GENERATED_STREAM)[0]
                                                                ).image.tobytes()
    messages, description = reference_texts(scenes=rich_scenes)(0)
    assert not any(isinstance(m["content"], list) for m in messages)  # no image at all
    assert description == rich_scenes.make_scene(training_seeds(rich_scenes, TEXT_STREAM)[0]).description
    messages, caption = reference_captions(scenes=rich_scenes)(0)
    scene = rich_scenes.make_scene(training_seeds(rich_scenes, CAPTION_STREAM)[0])
    assert caption == rich_scenes.caption(scene) and images(messages)[0].tobytes() == scene.image.tobytes()


def test_each_data_set_draws_its_own_seeds_reproducibly():
    first = [training_seeds(scenes, stream) for stream in (GENERATED_STREAM, TEXT_STREAM, CAPTION_STREAM, 0)]
    lists = [[seeds[i] for i in range(20)] for seeds in first]
    assert len({tuple(seeds) for seeds in lists}) == 4  # the target's own stream (0) differs too
    again = training_seeds(scenes, GENERATED_STREAM)
    assert again[17] == lists[0][17] and again[3] == lists[0][3]  # any order, same seeds
    assert all(not scenes.is_held_out(seed) for seeds in lists for seed in seeds)

"""The rich scenes of the 576-image-token demo target: deterministic per seed, every object drawn in
its cell, long texts that keep naming image content to their end, two-image comparisons, short
reference captions, and probe targets that line up with the image. No engine, no model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vispec_vllm.demo import rich_scenes
from vispec_vllm.demo.rich_scenes import (
    COLOURS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    caption,
    compare_messages,
    held_out_seeds,
    make_pair,
    make_scene,
    patch_targets,
    training_example,
    training_prompt,
)

SEEDS = range(150)
PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(seed) for seed in SEEDS]


def test_make_scene_is_deterministic():
    for seed in (0, 11, 1_000_004):
        a, b = make_scene(seed), make_scene(seed)
        assert a.image.tobytes() == b.image.tobytes() and (a.objects, a.turns) == (b.objects, b.turns)


def test_layout_and_labels(scenes):
    for scene in scenes:
        assert scene.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert 4 <= len(scene.objects) <= 9
        cells = [obj.cell for obj in scene.objects]
        assert cells == sorted(set(cells))
        assert len({obj.name for obj in scene.objects}) == len(scene.objects)
        assert len({obj.label for obj in scene.objects}) == len(scene.objects)
        assert all(1 <= obj.label <= 9 for obj in scene.objects)


def test_each_object_is_drawn_in_its_cell_with_a_label(scenes):
    """Each object's colour fills part of its cell and of no empty cell; a black label sits on it."""
    cell = IMAGE_SIZE // GRID
    for scene in scenes[:30]:
        pixels = np.asarray(scene.image, dtype=np.int16)
        occupied = {obj.cell: obj for obj in scene.objects}
        for row in range(GRID):
            for col in range(GRID):
                box = pixels[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
                obj = occupied.get((row, col))
                dark = int((box.max(axis=-1) < 60).sum())
                if obj is None:
                    assert (np.abs(box - 255).max(axis=-1) > 30).sum() == 0, (scene.seed, row, col)
                    continue
                close = int((np.abs(box - np.array(COLOURS[obj.colour])).max(axis=-1) < 12).sum())
                assert close >= 40 and dark >= 8, (scene.seed, obj, close, dark)


def test_descriptions_name_every_object_to_the_end(scenes):
    from vispec_vllm.demo.target import LLAVA15_SCALE, build_scene_tokenizer

    tokenizer = build_scene_tokenizer(LLAVA15_SCALE)
    lengths = []
    for scene in scenes:
        text = scene.description
        for obj in scene.objects:
            assert f"{obj.place.capitalize()}" in text and f"{obj.noun}" in text and str(obj.label) in text
        assert set(PAIR.findall(text)) == {(obj.colour, obj.shape) for obj in scene.objects}
        # The last quarter still names objects of this image.
        assert PAIR.search(text[3 * len(text) // 4:])
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    assert 150 <= min(lengths) and max(lengths) <= 420, (min(lengths), max(lengths))


def test_comparisons_have_two_images_and_name_both(scenes):
    pair = make_pair(5)
    assert pair.first.seed != pair.second.seed
    for scene in (pair.first, pair.second):
        assert all(f"{obj.noun} with {obj.label}" in pair.comparison for obj in scene.objects)
    assert compare_messages()[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]
    held_out_pair = make_pair(held_out_seeds(1)[0])
    assert rich_scenes.is_held_out(held_out_pair.second.seed)
    kinds = [len(training_example(seed)[0]) for seed in range(400)]
    assert 0.08 < kinds.count(2) / len(kinds) < 0.25  # some two-image conversations
    prompts = [len(training_prompt(seed)[0]) for seed in range(400)]
    assert prompts == kinds  # the draft data asks what the target was trained to answer


def test_captions_are_short_and_name_every_object(scenes):
    for scene in scenes[:30]:
        text = caption(scene)
        assert set(PAIR.findall(text)) == {(obj.colour, obj.shape) for obj in scene.objects}
        assert len(text.split()) < 40


def test_patch_targets_match_the_drawn_cells(scenes):
    scene = scenes[3]
    targets = patch_targets(scene, 8)
    assert targets.shape == (576, 5)
    side = IMAGE_SIZE // 8
    for obj in scene.objects:
        row, col = obj.cell
        centre = (row * 6 + 3) * side + col * 6 + 3  # 6 patches per cell side
        assert targets[centre, 0] == row * GRID + col
        assert targets[centre, 4] == obj.label  # label classes are 1 + (label - 1)
    assert (targets[:, 1] == 0).sum() == 36 * (GRID * GRID - len(scene.objects))


def test_held_out_layouts_never_occur_in_training():
    """Held out by content: no layout (set of occupied cells) of an evaluation scene, a comparison's
    second scene included, is the layout of any scene in the training stream."""
    import itertools

    held_out = held_out_seeds(200)
    comparisons = [seed for seed in held_out if rich_scenes.is_comparison(seed)]
    assert comparisons, "the held-out set has two-image prompts"
    held_out_layouts = {rich_scenes.layout(s) for seed in held_out for s in rich_scenes._example_scene_seeds(seed)}
    training = list(itertools.islice(rich_scenes.train_seed_stream(0), 5000))
    training_layouts = {rich_scenes.layout(s) for seed in training for s in rich_scenes._example_scene_seeds(seed)}
    assert held_out_layouts and training_layouts and not held_out_layouts & training_layouts
    assert all(rich_scenes.layout_is_held_out(cells) for cells in held_out_layouts)
    assert all(seed >= rich_scenes.HELD_OUT_START for seed in held_out)
    assert all(seed < rich_scenes.HELD_OUT_START for seed in training)
    # The split is by layout, not by seed: some training-range seeds have held-out layouts and are skipped.
    skipped = set(range(2000)) - set(itertools.islice(rich_scenes.train_seed_stream(0), 100_000))
    assert any(rich_scenes.layout_is_held_out(rich_scenes.layout(seed)) for seed in skipped)

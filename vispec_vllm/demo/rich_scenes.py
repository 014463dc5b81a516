"""Rich synthetic scenes for the demo target at LLaVA-1.5 scale (576 image tokens per image).

Like `vispec_vllm.demo.scenes`, a scene is a function of one integer seed, but closer to what a
real vision-language model is asked about:
- a 192x192 image (24x24 patches of 8 pixels: 576 image tokens, LLaVA-1.5's count) with 4-9
  objects on a 4x4 grid, each with a shape, a colour, a size and a drawn number label 1-9
  (seven-segment digits, so no font file is needed);
- a long description (about 150-400 tokens) that keeps referring to the image until its end:
  every object with its place and number, relations between neighbours (left of, above; larger or
  smaller number), then counts by colour and size;
- comparisons of two images ("Compare these two images."), which put two images in one prompt.
Held out by content as well as by seed: a scene's layout (the set of grid cells it occupies) falls
in one of eight buckets, and one bucket is never trained on. Training examples come from seeds below
`HELD_OUT_START` whose layouts (both layouts, for a comparison) lie outside that bucket; held-out
scenes from seeds from `HELD_OUT_START` on whose layouts lie inside it. So no layout of an evaluation
scene occurs in training.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from vispec_vllm.demo.scenes import (
    _NUMBERS,
    COLOURS,
    HELD_OUT_START,
    SHAPES,
    SIZES,
    _be,
    _capitalise,
    _plural,
    caption,
    cell_patch_targets,
    chat,
    draw_shape,
    is_held_out,
)
from vispec_vllm.demo.scenes import train_seed_stream as _seed_stream

# Shared with the 36-token scenes: the seed split, the chat layout and the short captions.
__all__ = ["HELD_OUT_START", "caption", "chat", "is_held_out"]

IMAGE_SIZE = 192
GRID = 4
MIN_OBJECTS, MAX_OBJECTS = 4, 9
LABELS = tuple(range(1, 10))
DESCRIBE_PROMPT = "Describe the image in detail."
DESCRIBE_PROMPTS = (
    DESCRIBE_PROMPT,
    "Describe this picture.",
    "What do you see in this image?",
    "Give a detailed description of the image.",
)
COMPARE_PROMPT = "Compare these two images."
COMPARE_FRACTION = 0.15  # of training conversations, with two images
LAYOUT_BUCKETS = 8  # one of them is held out
_ROWS = ("top", "second", "third", "bottom")
_COLUMNS = ("first", "second", "third", "fourth")
_SUPERSAMPLE = 3
# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom),
# e (bottom left), f (top left), g (middle).
_SEGMENTS = {1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg",
             9: "abcdfg"}


@dataclass(frozen=True)
class RichObject:
    """One labelled shape; `cell` is (row, column) in the 4x4 grid."""

    shape: str
    colour: str
    size: str
    label: int
    cell: tuple[int, int]

    @property
    def place(self) -> str:
        """Where the object is: "in the top row, second column"."""
        return f"in the {_ROWS[self.cell[0]]} row, {_COLUMNS[self.cell[1]]} column"

    @property
    def noun(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def name(self) -> str:
        """Colour and shape, unique within a scene: "red circle"."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class RichScene:
    """A seeded sample: the image, its objects in reading order, the description, and the training
    conversation's turns (a description request, sometimes followed by a question)."""

    seed: int
    image: Image.Image
    objects: tuple[RichObject, ...]
    description: str
    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ScenePair:
    """Two scenes and the comparison of them (a two-image prompt)."""

    first: RichScene
    second: RichScene
    comparison: str


def _layout(rng: random.Random) -> tuple[RichObject, ...]:
    count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = sorted(rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count))
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    labels = rng.sample(LABELS, count)
    return tuple(
        RichObject(shape=shape, colour=colour, size=rng.choice(SIZES), label=label, cell=cell)
        for cell, (colour, shape), label in zip(cells, pairs, labels, strict=True)
    )


def layout(seed: int) -> frozenset[tuple[int, int]]:
    """The grid cells the scene of `seed` occupies (its layout), without drawing it."""
    return frozenset(obj.cell for obj in _layout(random.Random(f"rich-{seed}")))


def layout_is_held_out(cells: frozenset[tuple[int, int]]) -> bool:
    """Whether a layout lies in the held-out bucket (a fixed hash of its cells, so the split is a
    property of the content, not of the seed)."""
    mask = sum(1 << (row * GRID + column) for row, column in cells)
    return (mask * 2654435761) % 2**32 % LAYOUT_BUCKETS == 0


def _example_scene_seeds(seed: int) -> tuple[int, ...]:
    """The scene seeds of example (or prompt) `seed`: its own, and a comparison's second."""
    return pair_seeds(seed) if is_comparison(seed) else (seed,)


def _example_layouts(seed: int) -> list[frozenset[tuple[int, int]]]:
    """The layouts of every scene in training example (or prompt) `seed`: one, or two for a comparison."""
    return [layout(s) for s in _example_scene_seeds(seed)]


def held_out_seeds(count: int) -> list[int]:
    """The first `count` held-out seeds, the evaluation set: from `HELD_OUT_START` on, and every
    scene of the example (a comparison's second too) in a held-out layout."""
    seeds: list[int] = []
    seed = HELD_OUT_START
    while len(seeds) < count:
        if all(layout_is_held_out(cells) for cells in _example_layouts(seed)):
            seeds.append(seed)
        seed += 1
    return seeds


def train_seed_stream(seed: int) -> Iterator[int]:
    """An endless, seeded stream of training seeds whose scenes all lie outside the held-out layouts."""
    for candidate in _seed_stream(seed):
        if not any(layout_is_held_out(cells) for cells in _example_layouts(candidate)):
            yield candidate


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, cx: float, cy: float, height: float) -> None:
    """A black seven-segment digit centred on (cx, cy)."""
    w, h, t = 0.55 * height, height / 2, max(1.0, 0.16 * height)
    left, right, top, middle, bottom = cx - w / 2, cx + w / 2, cy - h, cy, cy + h
    boxes = {
        "a": (left, top, right, top + t), "g": (left, middle - t / 2, right, middle + t / 2),
        "d": (left, bottom - t, right, bottom), "f": (left, top, left + t, middle),
        "b": (right - t, top, right, middle), "e": (left, middle, left + t, bottom),
        "c": (right - t, middle, right, bottom),
    }
    for segment in _SEGMENTS[digit]:
        draw.rectangle(boxes[segment], fill=(0, 0, 0))


def _draw(objects: Sequence[RichObject], rng: random.Random) -> Image.Image:
    """White image; each object near its cell's centre (jitter up to 3 pixels), its label on top."""
    s = _SUPERSAMPLE
    cell = IMAGE_SIZE / GRID
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), "white")
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        r = rng.uniform(19.0, 21.5) if obj.size == "large" else rng.uniform(13.0, 14.5)
        cx = (obj.cell[1] + 0.5) * cell + rng.uniform(-3, 3)
        cy = (obj.cell[0] + 0.5) * cell + rng.uniform(-3, 3)
        X, Y, R = cx * s, cy * s, r * s
        draw_shape(draw, obj.shape, COLOURS[obj.colour], X, Y, R)
        # Triangles and stars are narrow at the top: their digit sits lower and smaller.
        low = obj.shape in ("triangle", "star")
        _draw_digit(draw, obj.label, X, Y + (0.18 * R if low else 0), (0.62 if low else 0.9) * R)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def _object_sentence(obj: RichObject, rng: random.Random) -> str:
    place = _capitalise(obj.place)
    return rng.choice((
        f"{place}, there is a {obj.noun} with the number {obj.label}.",
        f"{place} sits a {obj.noun} marked {obj.label}.",
        f"{place} you can see a {obj.noun}, labelled {obj.label}.",
    ))


def _relation_sentence(a: RichObject, b: RichObject, rng: random.Random) -> str:
    """How b (next in reading order) stands to a: where, and how their numbers compare."""
    if a.cell[0] == b.cell[0]:
        where = rng.choice((f"The {b.name} is to the right of the {a.name}",
                            f"The {a.name} is to the left of the {b.name}"))
    else:
        where = rng.choice((f"The {b.name} is below the {a.name}", f"The {a.name} is above the {b.name}"))
    larger = "larger" if b.label > a.label else "smaller"
    return f"{where}, and the number {b.label} is {larger} than {a.label}."


def _summary_sentences(objects: Sequence[RichObject]) -> list[str]:
    colours = Counter(obj.colour for obj in objects)
    parts = [_plural(n, f"{colour} shape") for colour, n in sorted(colours.items(), key=lambda kv: (-kv[1], kv[0]))]
    listing = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else parts[0]
    large = sum(obj.size == "large" for obj in objects)
    highest = max(objects, key=lambda obj: obj.label)
    return [
        f"By colour, there {_be(len(objects))} {listing}.",
        f"{_capitalise(_NUMBERS[large])} of them {_be(large)} large and "
        f"{_NUMBERS[len(objects) - large]} {_be(len(objects) - large)} small.",
        f"The highest number is {highest.label}, on the {highest.name}.",
    ]


def _describe(objects: Sequence[RichObject], rng: random.Random) -> str:
    n = len(objects)
    intro = rng.choice((
        f"The image shows {_plural(n, 'shape')} on a white background, each marked with a number.",
        f"There are {_plural(n, 'numbered shape')} in this picture.",
        f"I can see {_plural(n, 'shape')} in the image, each with a number on it.",
    ))
    sentences = [intro, *(_object_sentence(obj, rng) for obj in objects)]
    sentences += [_relation_sentence(a, b, rng) for a, b in zip(objects, objects[1:], strict=False)]
    sentences += _summary_sentences(objects)
    return " ".join(sentences)


def _question(objects: Sequence[RichObject], rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(objects)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What number is on the {obj.name}?", f"The {obj.name} {obj.place} has the number {obj.label}."
    if kind == 1:
        return f"Where is the {obj.name}?", f"It is {obj.place}, and it is {obj.size}."
    return f"Which shape has the number {obj.label}?", f"The {obj.noun} {obj.place} has the number {obj.label}."


def _objects_and_texts(seed: int) -> tuple[tuple[RichObject, ...], str, tuple[tuple[str, str], ...]]:
    rng = random.Random(f"rich-{seed}")
    objects = _layout(rng)
    description = _describe(objects, rng)
    turns: tuple[tuple[str, str], ...] = ((rng.choice(DESCRIBE_PROMPTS), description),)
    if rng.random() < 0.3:
        turns += (_question(objects, rng),)
    return objects, description, turns


def make_scene(seed: int) -> RichScene:
    """The scene of `seed`: the same seed always gives the same image and texts."""
    objects, description, turns = _objects_and_texts(seed)
    image = _draw(objects, random.Random(f"rich-image-{seed}"))
    return RichScene(seed=seed, image=image, objects=objects, description=description, turns=turns)


def _short_listing(objects: Sequence[RichObject]) -> str:
    return ", ".join(f"a {obj.noun} with {obj.label}" for obj in objects)


def _comparison(first: Sequence[RichObject], second: Sequence[RichObject]) -> str:
    sentences = [
        f"The first image has {_plural(len(first), 'shape')} and the second has {_plural(len(second), 'shape')}.",
        f"In the first image there are {_short_listing(first)}.",
        f"In the second image there are {_short_listing(second)}.",
    ]
    common = sorted({obj.name for obj in first} & {obj.name for obj in second})
    if common:
        sentences.append(f"Both images contain a {' and a '.join(common)}.")
    else:
        sentences.append("No shape appears in both images.")
    return " ".join(sentences)


def pair_seeds(seed: int) -> tuple[int, int]:
    """The two scene seeds of comparison `seed` (both training or both held out, as `seed` is; a
    held-out comparison's second scene is the next held-out seed in a held-out layout)."""
    if not is_held_out(seed):
        return seed, (seed * 48271 + 11) % HELD_OUT_START
    second = HELD_OUT_START + (seed * 48271 + 11) % 2**31
    while not layout_is_held_out(layout(second)):
        second += 1
    return seed, second


def make_pair(seed: int) -> ScenePair:
    a, b = (make_scene(s) for s in pair_seeds(seed))
    return ScenePair(first=a, second=b, comparison=_comparison(a.objects, b.objects))


def is_comparison(seed: int) -> bool:
    """Whether example `seed` compares two images (COMPARE_FRACTION of seeds)."""
    return random.Random(f"kind-{seed}").random() < COMPARE_FRACTION


def training_example(seed: int) -> tuple[list[RichScene], list[dict]]:
    """The scenes and chat messages of training example `seed`: usually one scene's conversation,
    for COMPARE_FRACTION of seeds the comparison of two scenes."""
    if is_comparison(seed):
        pair = make_pair(seed)
        return [pair.first, pair.second], chat([(COMPARE_PROMPT, pair.comparison)], num_images=2)
    scene = make_scene(seed)
    return [scene], chat(scene.turns)


def training_prompt(seed: int) -> tuple[list[RichScene], list[dict]]:
    """The scenes and the prompt (no answer) of draft-training example `seed`: a description
    request, or for COMPARE_FRACTION of seeds a comparison of two images."""
    if is_comparison(seed):
        pair = make_pair(seed)
        return [pair.first, pair.second], compare_messages()
    return [make_scene(seed)], describe_messages()


def describe_messages() -> list[dict]:
    return chat([(DESCRIBE_PROMPT, None)])


def compare_messages() -> list[dict]:
    return chat([(COMPARE_PROMPT, None)], num_images=2)


def scene_texts(seeds: Sequence[int]) -> Iterator[str]:
    """Every prompt, description, answer and comparison of `seeds` (a tokenizer corpus)."""
    yield from (*DESCRIBE_PROMPTS, COMPARE_PROMPT)
    for seed in seeds:
        objects, description, turns = _objects_and_texts(seed)
        yield description
        for question, answer in turns[1:]:
            yield question
            yield answer
        yield _comparison(objects, _objects_and_texts(pair_seeds(seed)[1])[0])


def patch_targets(scene: RichScene, patch_size: int) -> torch.Tensor:
    """Probe targets per image token: the cell, and its object's colour, shape, size and label."""
    colours = list(COLOURS)
    return cell_patch_targets(scene.objects, IMAGE_SIZE, GRID, patch_size, lambda obj: (
        colours.index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size), obj.label - 1), 4)


PROBE_CLASSES = (GRID * GRID, len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1, len(LABELS) + 1)


_OBJECT_SENTENCE = re.compile(
    r"In the (\w+) row, (\w+) column(?:,)? (?:there is|sits|you can see) a (small|large) (\w+) (\w+)"
    r"(?: with the number| marked|, labelled) (\d)"
)


def described_objects(text: str) -> set[tuple[str, str, str, str, int]]:
    """(place, size, colour, shape, label) of every object sentence of a description."""
    return {(f"in the {row} row, {column} column", size, colour, shape, int(label))
            for row, column, size, colour, shape, label in _OBJECT_SENTENCE.findall(text)}


@dataclass(frozen=True)
class ObjectAccuracy:
    """How many of a scene's objects one description gets right, object sentence by object sentence."""

    named_in_place: int  # colour and shape at the right place, whatever size and number label
    fully_right: int  # place, size, colour, shape and number label


def object_accuracy(text: str, objects: Sequence[RichObject]) -> ObjectAccuracy:
    """What a description gets right of `objects` (the demo and benchmarks/description_accuracy.py
    both count with this)."""
    described = described_objects(text)
    placed = {(place, colour, shape) for place, _, colour, shape, _ in described}
    return ObjectAccuracy(
        named_in_place=sum((obj.place, obj.colour, obj.shape) in placed for obj in objects),
        fully_right=sum((obj.place, obj.size, obj.colour, obj.shape, obj.label) in described for obj in objects))

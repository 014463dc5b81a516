"""Synthetic scenes made by code: images of coloured shapes with long, image-dependent texts.

The demo target (`vispec_vllm.demo.target`) is trained from scratch on these scenes, so that a
vision-language model small enough for a 2-core CPU still says things a text-only model cannot
guess: which colours and shapes are in the picture, where they are, how big, how many.

A scene is a function of one integer seed (`make_scene(seed)`): a 96x96 RGB image with 1-4
objects, each in its own cell of a 3x3 grid, with a shape, a colour and a size; a description of
several sentences built by a small templated grammar whose phrasings are picked by the seeded RNG;
and question-answer pairs about the same objects. Seeds below `HELD_OUT_START` are for training,
seeds from it on are held out for evaluation, so evaluation images are never trained on.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 3
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
MAX_OBJECTS = 4
HELD_OUT_START = 1_000_000
DESCRIBE_PROMPT = "Describe the image in detail."
DESCRIBE_PROMPTS = (
    DESCRIBE_PROMPT,
    "Describe this picture.",
    "What do you see in this image?",
    "Give a detailed description of the image.",
)

# Cell (row, col) -> where it is, as a phrase that follows a noun ("a red circle in the centre").
# Rows run top to bottom, columns left to right.
_PLACES = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
# Counts up to nine: the rich scenes (`rich_scenes.py`) share these helpers.
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NONE_OR = ("none", *_NUMBERS[1:])
_ORDINALS = ("first", "second", "third", "fourth")
_SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled, so their edges are smooth
_QA_PER_SCENE = 3


@dataclass(frozen=True)
class SceneObject:
    """One shape in the picture; `cell` is (row, column) in the 3x3 grid."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]

    @property
    def place(self) -> str:
        """Where the object is, as a phrase: "in the top left corner", "on the right", ..."""
        return _PLACES[self.cell]

    @property
    def noun(self) -> str:
        """The object's full name without article: "large red circle"."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A seeded sample: the image, its objects in reading order, and texts about it.

    `turns` is the training conversation as (question, answer) pairs: usually a request for a
    description first, then some of the question-answer pairs; sometimes question-answer pairs only.
    """

    seed: int
    image: Image.Image
    objects: tuple[SceneObject, ...]
    description: str
    qa: tuple[tuple[str, str], ...]
    turns: tuple[tuple[str, str], ...]


def is_held_out(seed: int) -> bool:
    """Held-out seeds (>= HELD_OUT_START) are never used for training."""
    return seed >= HELD_OUT_START


def held_out_seeds(count: int) -> list[int]:
    """The first `count` held-out seeds, the evaluation set."""
    return list(range(HELD_OUT_START, HELD_OUT_START + count))


def train_seed_stream(seed: int) -> Iterator[int]:
    """An endless, seeded stream of training seeds, so every training example is a fresh scene."""
    rng = random.Random(seed)
    while True:
        yield rng.randrange(HELD_OUT_START)


def _plural(count: int, word: str) -> str:
    return f"{_NUMBERS[count]} {word}" + ("" if count == 1 else "s")


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _layout(rng: random.Random) -> tuple[SceneObject, ...]:
    """1-4 objects in distinct cells, with distinct (colour, shape) pairs so each can be named."""
    count = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(sorted(_PLACES), count))
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    return tuple(
        SceneObject(shape=shape, colour=colour, size=rng.choice(SIZES), cell=cell)
        for cell, (colour, shape) in zip(cells, pairs, strict=True)
    )


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    # A five-pointed star: outer points alternate with inner ones at 0.45 of the radius.
    return [
        (cx + (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
         cy - (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5))
        for i in range(10)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], cx: float, cy: float,
               r: float) -> None:
    """One filled shape of radius `r` centred on (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r  # a square of the circle's radius looks bigger than the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)


def _draw(objects: Sequence[SceneObject], rng: random.Random) -> Image.Image:
    """White image; each object at its cell's centre, jittered by up to 2 pixels, radius by size.

    Objects stay near cell centres so that with 16-pixel patches (two per cell) every patch sees
    a similar quarter of its shape: a patch-based vision tower trained from scratch for a few CPU
    minutes then tells shapes apart; with free placement it barely learns them.
    """
    s = _SUPERSAMPLE
    cell = IMAGE_SIZE / GRID
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), "white")
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        r = rng.uniform(12.5, 14.5) if obj.size == "large" else rng.uniform(7.0, 8.5)
        slack = min(cell / 2 - r - 1.5, 2.0)
        cx = (obj.cell[1] + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (obj.cell[0] + 0.5) * cell + rng.uniform(-slack, slack)
        draw_shape(draw, obj.shape, COLOURS[obj.colour], cx * s, cy * s, r * s)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def _object_sentence(obj: SceneObject, index: int, rng: random.Random) -> str:
    """One object, its place first: a model then names the next occupied cell and reads what is
    there, rather than having to do both before the first word (which a small model learns slowly)."""
    place = _capitalise(obj.place)
    return rng.choice(
        (
            f"{place} sits a {obj.noun}.",
            f"{place}, there is a {obj.noun}.",
            f"{place} you can see a {obj.noun}.",
            f"The {_ORDINALS[index]} shape, {obj.place}, is a {obj.noun}.",
        )
    )


def _summary_sentences(objects: Sequence[SceneObject], rng: random.Random) -> list[str]:
    """Facts about the whole picture: sizes, repeated colours or shapes."""
    n = len(objects)
    if n == 1:
        obj = objects[0]
        alone = rng.choice(("It is the only shape in the picture.", f"The {obj.colour} {obj.shape} is alone."))
        size = rng.choice((
            f"It is {obj.size}, and the rest of the image is empty.",
            f"There are no other shapes, and the {obj.shape} is {obj.size}.",
        ))
        return [alone, size]
    large = sum(obj.size == "large" for obj in objects)
    sizes = rng.choice((
        f"There {_be(large)} {_plural(large, 'large shape')} and {_plural(n - large, 'small shape')}.",
        f"{_capitalise(_NONE_OR[large])} of them {_be(large)} large and {_NONE_OR[n - large]} {_be(n - large)} small.",
    ))
    colour, colour_count = Counter(obj.colour for obj in objects).most_common(1)[0]
    shape, shape_count = Counter(obj.shape for obj in objects).most_common(1)[0]
    options = []
    if colour_count > 1:
        options.append(f"{_capitalise(_NUMBERS[colour_count])} of the shapes are {colour}.")
    if shape_count > 1:
        options.append(f"{_capitalise(_NUMBERS[shape_count])} of the shapes are {shape}s.")
    if colour_count == 1 and shape_count == 1:
        options.append("Every shape has a different colour and a different form.")
    return [sizes, rng.choice(options)]


def _describe(objects: Sequence[SceneObject], rng: random.Random) -> str:
    n = len(objects)
    intro = rng.choice((
        f"The image shows {_plural(n, 'shape')} on a white background.",
        f"There {_be(n)} {_plural(n, 'object')} in this picture.",
        f"This picture contains {_plural(n, 'shape')}.",
        f"I can see {_plural(n, 'shape')} in the image.",
    ))
    sentences = [intro, *(_object_sentence(obj, i, rng) for i, obj in enumerate(objects))]
    sentences += _summary_sentences(objects, rng)
    sentences.append(rng.choice(("The background is plain white.", "Nothing else is in the picture.")))
    return " ".join(sentences)


def _question(objects: Sequence[SceneObject], rng: random.Random) -> tuple[str, str]:
    """One question-answer pair; each kind needs the image to answer."""
    obj = rng.choice(objects)
    kind = rng.randrange(7)
    if kind == 0:
        return f"What colour is the {obj.size} {obj.shape} {obj.place}?", f"It is {obj.colour}."
    if kind == 1:
        cell = rng.choice(sorted(_PLACES))
        here = [o for o in objects if o.cell == cell]
        answer = f"There is a {here[0].noun}." if here else "Nothing, that part of the image is empty."
        return f"What is {_PLACES[cell]}?", answer
    if kind == 2:
        n = len(objects)
        return "How many shapes are there?", f"There {_be(n)} {_plural(n, 'shape')}."
    if kind == 3:
        colour = rng.choice(list(COLOURS))
        k = sum(o.colour == colour for o in objects)
        return f"How many {colour} shapes are there?", f"There {_be(k)} {_plural(k, colour + ' shape')}."
    if kind == 4:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if rng.random() < 0.5:
            colour, shape = obj.colour, obj.shape
        match = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
        answer = f"Yes, there is a {match[0].noun} {match[0].place}." if match else f"No, there is no {colour} {shape}."
        article = "an" if colour[0] in "aeiou" else "a"
        return f"Is there {article} {colour} {shape}?", answer
    if kind == 5:
        return f"Where is the {obj.colour} {obj.shape}?", f"It is {obj.place}."
    return f"Is the {obj.colour} {obj.shape} large or small?", f"It is {obj.size}."


_Texts = tuple[tuple[SceneObject, ...], str, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]


def _objects_and_texts(seed: int) -> _Texts:
    """Objects and texts of `seed`, without the image: the image is drawn from its own RNG stream,
    so that texts alone (a tokenizer corpus) are cheap to make."""
    rng = random.Random(seed)
    objects = _layout(rng)
    description = _describe(objects, rng)
    qa = tuple(_question(objects, rng) for _ in range(_QA_PER_SCENE))
    if rng.random() < 0.75:
        turns = ((rng.choice(DESCRIBE_PROMPTS), description), *qa[: rng.randint(0, _QA_PER_SCENE)])
    else:
        turns = qa
    return objects, description, qa, turns


def make_scene(seed: int) -> Scene:
    """The scene of `seed`: the same seed always gives the same image and texts."""
    objects, description, qa, turns = _objects_and_texts(seed)
    image = _draw(objects, random.Random(f"image-{seed}"))
    return Scene(seed=seed, image=image, objects=objects, description=description, qa=qa, turns=turns)


def chat(turns: Sequence[tuple[str, str | None]], num_images: int = 1) -> list[dict]:
    """Chat messages for `turns`, with `num_images` images in the first user turn (the LLaVA layout).

    An answer of None ends the messages with that user turn: a prompt for the model to answer.
    """
    messages: list[dict] = []
    for i, (question, answer) in enumerate(turns):
        text = {"type": "text", "text": question}
        messages.append({"role": "user", "content": [*[{"type": "image"}] * num_images, text] if i == 0 else [text]})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def conversation(scene: Scene) -> list[dict]:
    """The scene's training conversation (`scene.turns`) as chat messages."""
    return chat(scene.turns)


def describe_messages() -> list[dict]:
    """The evaluation prompt: the image and a request for a detailed description."""
    return chat([(DESCRIBE_PROMPT, None)])


def scene_texts(seeds: Sequence[int]) -> Iterator[str]:
    """Every question, answer and description of the scenes of `seeds` (a tokenizer corpus)."""
    yield from DESCRIBE_PROMPTS
    for seed in seeds:
        _, description, qa, _ = _objects_and_texts(seed)
        yield description
        for question, answer in qa:
            yield question
            yield answer


def training_example(seed: int) -> tuple[list[Scene], list[dict]]:
    """The scenes and chat messages of training example `seed` (one scene's conversation)."""
    scene = make_scene(seed)
    return [scene], conversation(scene)


def training_prompt(seed: int) -> tuple[list[Scene], list[dict]]:
    """The scenes and the prompt (no answer) of draft-training example `seed`: a description request."""
    return [make_scene(seed)], describe_messages()


def caption(scene) -> str:
    """A short reference caption written by the scene generator (the `eagle-captions` baseline's
    fine-tuning data): how many shapes, and their colours and shapes (either scene kind)."""
    names = ", ".join(f"{'an' if obj.colour[0] in 'aeiou' else 'a'} {obj.colour} {obj.shape}" for obj in scene.objects)
    return f"{_capitalise(_plural(len(scene.objects), 'shape'))}: {names}."


def cell_patch_targets(objects: Sequence, image_size: int, grid: int, patch_size: int,
                       attributes: Callable[[object], tuple[int, ...]], num_attributes: int) -> torch.Tensor:
    """(patches, 1 + num_attributes) probe targets: for the grid cell under each patch's centre, the
    cell index and `attributes` of the object in that cell, each shifted by one (0: empty cell)."""
    side = image_size // patch_size
    by_cell = {obj.cell: obj for obj in objects}
    rows = []
    for patch in range(side * side):
        y, x = ((patch // side + 0.5) * patch_size, (patch % side + 0.5) * patch_size)
        cell = (int(y * grid // image_size), int(x * grid // image_size))
        obj = by_cell.get(cell)
        values = attributes(obj) if obj else (-1,) * num_attributes
        rows.append((cell[0] * grid + cell[1], *(1 + a for a in values)))
    return torch.tensor(rows)


def patch_targets(scene: Scene, patch_size: int) -> torch.Tensor:
    """Probe targets per image token: the cell, and its object's colour, shape and size."""
    colours = list(COLOURS)
    return cell_patch_targets(scene.objects, IMAGE_SIZE, GRID, patch_size, lambda obj: (
        colours.index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size)), 3)


# The probe's classes per image token: its grid cell, and its object's colour, shape and size.
PROBE_CLASSES = (GRID * GRID, len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)

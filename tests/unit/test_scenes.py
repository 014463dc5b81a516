"""The synthetic scenes the demo target is trained on: deterministic per seed, texts that say what
the image shows, a train/held-out split that never overlaps, and a tokenizer that covers them.
No vLLM engine and no model: these run in seconds."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from vispec_vllm.demo.scenes import (
    COLOURS,
    DESCRIBE_PROMPT,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    conversation,
    describe_messages,
    held_out_seeds,
    is_held_out,
    make_scene,
    scene_texts,
    train_seed_stream,
)

SEEDS = range(200)
NUMBER_WORDS = ("one", "two", "three", "four")


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(seed) for seed in SEEDS]


def test_make_scene_is_deterministic():
    for seed in (0, 7, 123_456, 1_000_003):
        a, b = make_scene(seed), make_scene(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.objects, a.description, a.qa, a.turns) == (b.objects, b.description, b.qa, b.turns)


def test_seeds_give_different_scenes(scenes):
    assert len({scene.description for scene in scenes}) > 0.95 * len(scenes)


def test_scene_layout(scenes):
    for scene in scenes:
        assert scene.image.size == (IMAGE_SIZE, IMAGE_SIZE) and scene.image.mode == "RGB"
        assert 1 <= len(scene.objects) <= 4
        cells = [obj.cell for obj in scene.objects]
        assert cells == sorted(set(cells))  # distinct cells, in reading order
        assert len({(obj.colour, obj.shape) for obj in scene.objects}) == len(scene.objects)


def test_image_shows_each_object_in_its_cell(scenes):
    """Each object's colour is drawn inside its own grid cell, and no colour appears elsewhere."""
    cell = IMAGE_SIZE // GRID
    for scene in scenes[:50]:
        pixels = np.asarray(scene.image, dtype=np.int16)
        for row, col in itertools.product(range(GRID), range(GRID)):
            box = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            for name, rgb in COLOURS.items():
                close = int((np.abs(box - np.array(rgb)).max(axis=-1) < 12).sum())
                expected = any(obj.colour == name and obj.cell == (row, col) for obj in scene.objects)
                assert (close >= 10) == expected, (scene.seed, (row, col), name, close)


def test_description_names_each_object(scenes):
    for scene in scenes:
        text = scene.description
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in text
            assert obj.place in text.lower()
        n = len(scene.objects)
        assert re.search(rf"\b{NUMBER_WORDS[n - 1]} (shape|object)s?\b", text.split(".")[0])
        named = set(re.findall(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b", text))
        assert named == {(obj.colour, obj.shape) for obj in scene.objects}  # nothing made up
        absent = set(COLOURS) - {obj.colour for obj in scene.objects}
        assert not any(re.search(rf"\b{colour}\b", text) for colour in absent)


def test_descriptions_are_long_and_varied(scenes):
    descriptions = [scene.description for scene in scenes]
    words = [len(re.findall(r"\w+|[.,]", text)) for text in descriptions]
    assert min(words) >= 35 and max(words) <= 120
    openings = {text.split(" ")[0] for text in descriptions}
    assert len(openings) >= 3  # several phrasings


def test_qa_answers_depend_on_the_image(scenes):
    answers: dict[str, set[str]] = {}
    for scene in scenes:
        for question, answer in scene.qa:
            answers.setdefault(question, set()).add(answer)
        for obj in scene.objects:
            question = f"Where is the {obj.colour} {obj.shape}?"
            if question in dict(scene.qa):
                assert dict(scene.qa)[question] == f"It is {obj.place}."
    # The same question gets different answers for different images.
    assert len(answers["How many shapes are there?"]) == 4


def test_chat_format(scenes):
    scene = scenes[5]
    messages = conversation(scene)
    assert [m["role"] for m in messages] == ["user", "assistant"] * len(scene.turns)
    assert messages[0]["content"][0] == {"type": "image"}
    assert messages[0]["content"][1] == {"type": "text", "text": scene.turns[0][0]}
    assert all({"type": "image"} not in m["content"] for m in messages[2::2])
    assert all(isinstance(m["content"], str) for m in messages[1::2])
    assert describe_messages() == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]}
    ]
    described = sum(scene.turns[0][1] == scene.description for scene in scenes)
    assert 0.6 * len(scenes) < described < 0.9 * len(scenes)  # mostly a description first, sometimes QA only


def test_train_and_held_out_seeds_are_disjoint():
    held_out = held_out_seeds(1000)
    assert all(is_held_out(seed) for seed in held_out)
    train = list(itertools.islice(train_seed_stream(0), 20_000))
    assert not any(is_held_out(seed) for seed in train)
    assert not set(train) & set(held_out)
    assert list(itertools.islice(train_seed_stream(0), 100)) == train[:100]  # seeded
    assert list(itertools.islice(train_seed_stream(1), 100)) != train[:100]


@pytest.fixture(scope="module")
def tokenizer():
    from vispec_vllm.demo.target import build_scene_tokenizer

    return build_scene_tokenizer()


def test_scene_texts_tokenize_within_the_vocabulary(tokenizer):
    from vispec_vllm.demo.target import VOCAB_SIZE

    assert len(tokenizer) == VOCAB_SIZE
    texts = list(scene_texts(held_out_seeds(100)))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < VOCAB_SIZE and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # Trained on scene texts, the BPE keeps scene words whole: about one token per word.
    descriptions = [make_scene(seed).description for seed in held_out_seeds(50)]
    tokens = sum(len(tokenizer(text)["input_ids"]) for text in descriptions)
    words = sum(len(re.findall(r"\w+|[.,]", text)) for text in descriptions)
    assert tokens <= 1.1 * words
    for word in [*COLOURS, *SHAPES, "small", "large"]:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_the_image_token(tokenizer):
    text = tokenizer.apply_chat_template(conversation(make_scene(3)), tokenize=False)
    assert text.startswith("<s>USER: <image>\n")
    assert text.count("<image>") == 1 and text.endswith("</s>")


def test_tokenizer_is_rebuilt_identically(tokenizer):
    """A resumed training run rebuilds the tokenizer; it must give the same ids."""
    from vispec_vllm.demo.target import build_scene_tokenizer

    assert build_scene_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_training_labels_cover_only_the_answers():
    """Training ids equal what the LLaVA processor (and so vLLM) feeds the model, and only the
    assistant's answers (with their end-of-turn token) are trained on."""
    from vispec_vllm.demo.target import NUM_IMAGE_TOKENS, build_demo_target, encode_conversation

    _, processor = build_demo_target()
    scene = make_scene(3)
    messages = conversation(scene)
    ids, labels = encode_conversation(processor, messages)
    text = processor.apply_chat_template(messages, tokenize=False)
    reference = processor(text=[text], images=[scene.image], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == reference
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == NUM_IMAGE_TOKENS
    trained = processor.tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label != -100])
    assert trained == "".join(f" {answer}</s>" for _, answer in scene.turns)

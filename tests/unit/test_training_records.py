"""Draft training records line up with the shipped demo targets (36 and 576 image tokens per
image, one and two images): row i pairs the target's h_i with x_{i+1}, the image mask covers exactly
the image tokens, and e holds the image features there and the token embeddings elsewhere.
HF transformers only, no vLLM engine: a few seconds per target."""

from __future__ import annotations

import pytest
import torch

from vispec_vllm.demo.models import DEMO_PAIRS
from vispec_vllm.demo.prompts import reference_captions, with_images
from vispec_vllm.demo.target import RECIPES
from vispec_vllm.training.data import TargetRecorder

ANSWER_TOKENS = 48


@pytest.fixture(scope="module", params=sorted(DEMO_PAIRS))
def recorder(request) -> tuple[int, TargetRecorder]:
    torch.set_num_threads(1)
    return request.param, TargetRecorder(DEMO_PAIRS[request.param][0])


def prompts(image_tokens: int) -> list[list[dict]]:
    """A held-out describe prompt, and on rich scenes a held-out two-image comparison."""
    scenes = RECIPES[image_tokens].scenes
    scene = scenes.make_scene(scenes.held_out_seeds(1)[0])
    result = [with_images(scenes.describe_messages(), [scene.image])]
    if hasattr(scenes, "compare_messages"):
        pair = scenes.make_pair(scenes.held_out_seeds(2)[1])
        result.append(with_images(scenes.compare_messages(), [pair.first.image, pair.second.image]))
    return result


def greedy_answer(recorder: TargetRecorder, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Prompt ids and the target's greedy answer (HF generate), as vLLM would produce them."""
    hf_messages = [{**m, "content": [{"type": "image"} if p["type"] == "image_pil" else p for p in m["content"]]}
                   for m in messages]
    images = [p["image_pil"] for m in messages for p in m["content"] if p["type"] == "image_pil"]
    text = recorder.processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    inputs = recorder.processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        out = recorder.model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


def test_records_pair_h_i_with_the_next_token(recorder):
    image_tokens, rec = recorder
    lm_head = rec.model.lm_head.weight.float()
    for messages in prompts(image_tokens):
        prompt_ids, answer_ids = greedy_answer(rec, messages)
        record = rec.record(messages, prompt_ids, answer_ids)
        ids = record["input_ids"]
        assert ids.tolist() == prompt_ids + answer_ids
        assert record["loss_mask"].tolist() == [0] * len(prompt_ids) + [1] * len(answer_ids)
        # Row i of the draft pairs h_i with x_{i+1}: the target's greedy choice at i is x_{i+1}.
        rows = torch.arange(len(prompt_ids) - 1, len(ids) - 1)
        predicted = (record["hidden_states"][rows].float() @ lm_head.T).argmax(-1)
        assert (predicted != ids[rows + 1]).sum() <= 1  # fp16-stored h may flip one near-tie


def test_image_mask_covers_exactly_the_image_tokens(recorder):
    image_tokens, rec = recorder
    embed = rec.model.get_input_embeddings().weight
    for messages in prompts(image_tokens):
        images = [p["image_pil"] for m in messages for p in m["content"] if p["type"] == "image_pil"]
        prompt_ids, answer_ids = greedy_answer(rec, messages)
        record = rec.record(messages, prompt_ids, answer_ids)
        mask = record["image_mask"].bool()
        assert int(mask.sum()) == image_tokens * len(images)
        assert torch.equal(mask, record["input_ids"] == rec.image_token_id)
        # Each image is one contiguous run of its tokens.
        edges = torch.diff(mask.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8))
        assert int((edges == 1).sum()) == len(images)
        # e: token embeddings on text rows, the image features (not the placeholder's embedding) on image rows.
        embeds = record["inputs_embeds"].float()
        text_rows = ~mask
        assert torch.allclose(embeds[text_rows], embed[record["input_ids"][text_rows]].float(), atol=1e-3)
        placeholder = embed[rec.image_token_id].float()
        assert (embeds[mask] - placeholder).abs().amax(-1).min() > 1e-2


def test_reference_records_teacher_force_the_scene_generator_caption(recorder):
    image_tokens, rec = recorder
    messages, answer = reference_captions(scenes=RECIPES[image_tokens].scenes)(0)
    prompt_ids, answer_ids = rec.tokenize_answer(messages, answer)
    assert rec.processor.tokenizer.decode(answer_ids) == f" {answer}</s>"
    record = rec.record(messages, prompt_ids, answer_ids)
    assert int(record["loss_mask"].sum()) == len(answer_ids)

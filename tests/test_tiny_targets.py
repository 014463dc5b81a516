"""Each tiny target runs in vLLM (CPU) with images: offline `LLM.chat`, and the OpenAI endpoint of
`vispec-vllm serve` on 127.0.0.1. Greedy vLLM output equals HF transformers' greedy output, which
shows the factory writes real, correctly laid-out models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, make_llm, shutdown_llm

from vispec_vllm.demo.server import VLLMServer, image_data_url

pytestmark = pytest.mark.engine

TARGETS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2_5_vl"]
QUESTION = "Describe the image in detail."
MAX_TOKENS = 16


def user_turn(image_part: dict) -> list[dict]:
    return [{"role": "user", "content": [image_part, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module", params=TARGETS)
def target_llm(request, tiny_models):
    llm = make_llm(tiny_models / request.param)
    yield request.param, llm
    shutdown_llm(llm)


def hf_greedy(target_dir, image) -> list[int]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(target_dir)
    model = AutoModelForImageTextToText.from_pretrained(target_dir, dtype=torch.float32).eval()
    text = processor.apply_chat_template(user_turn({"type": "image"}), add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_llm_chat_with_image_matches_hf(target_llm, tiny_models):
    from vllm import SamplingParams

    name, llm = target_llm
    image = make_image("blue")
    out = llm.chat(user_turn({"type": "image_pil", "image_pil": image}),
                   SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    config = llm.llm_engine.model_config.hf_config
    image_token = getattr(config, "image_token_index", None) or config.image_token_id
    assert out.prompt_token_ids.count(image_token) >= 16  # the image really was expanded
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
    assert list(out.outputs[0].token_ids) == hf_greedy(tiny_models / name, image)


@pytest.mark.server
@pytest.mark.parametrize("name", TARGETS)
def test_openai_chat_endpoint_with_image(tiny_models, tmp_path, name):
    image_part = {"type": "image_url", "image_url": {"url": image_data_url(make_image("green", "rectangle"))}}
    serve_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                  "--limit-mm-per-prompt", '{"image": 1}']
    with VLLMServer(tiny_models / name, serve_args, log_path=tmp_path / "server.log") as server:
        status, body = server.chat([image_part, {"type": "text", "text": QUESTION}], max_tokens=8)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] >= 1
        assert body["usage"]["prompt_tokens"] >= 16 + 4  # image tokens plus the question
        assert isinstance(body["choices"][0]["message"]["content"], str)
        pid = server.process.pid
    assert server.process.poll() is not None, f"server {pid} still running after stop()"

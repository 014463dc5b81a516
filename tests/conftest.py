"""Shared fixtures: tiny offline models (written once per session) and in-process vLLM engines."""

from __future__ import annotations

import gc
import os
from pathlib import Path

# In-process engines build in ~5 s instead of 40-50 s; must be set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vispec_vllm.factory.tiny_models import write_tiny_models  # noqa: E402


def pytest_configure(config) -> None:
    # Tiers: tests/unit starts no engine (`pytest tests/unit`); `-m "not server"` or `-m "not engine"` skip the rest.
    config.addinivalue_line("markers", "engine: builds a vLLM engine (in process, or in a subprocess it runs)")
    config.addinivalue_line("markers", "server: starts vLLM servers (subprocesses on 127.0.0.1)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))["tiny-llava"].parent


def make_image(colour: str = "red", shape: str = "ellipse", size: tuple[int, int] = (112, 112)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    getattr(ImageDraw.Draw(image), shape)((6, 6, size[0] - 10, size[1] - 8), fill=colour)
    return image


def make_llm(model: str | Path, **overrides):
    """An in-process float32 vLLM engine (fp32 so outputs compare exactly across configs)."""
    from vllm import LLM

    kwargs = dict(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=8,
        seed=0,
        distributed_executor_backend="uni",
        limit_mm_per_prompt={"image": 2},
        # Small blocks, so that short tiny-model prompts fill whole blocks and hit the prefix cache.
        block_size=32,
    )
    kwargs.update(overrides)
    return LLM(**kwargs)


def shutdown_llm(llm) -> None:
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()


def image_part(colour: str = "red", shape: str = "ellipse") -> dict:
    return {"type": "image_pil", "image_pil": make_image(colour, shape)}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def mixed_conversations() -> list[list[dict]]:
    """Image+text prompts, a text-only prompt and a prompt with two images."""
    describe = text_part("Describe the image in detail. Say which shapes you see, their colours, sizes and "
                         "positions, and count the objects on the left and on the right.")
    return [
        [{"role": "user", "content": [image_part("red"), describe]}],
        [{"role": "user", "content": [image_part("blue", "rectangle"), describe]}],
        [{"role": "user", "content": "Count the objects."}],
        [{"role": "user", "content": [image_part("purple"), text_part("What is left?"),
                                      image_part("orange", "rectangle"), text_part("And right?")]}],
        [{"role": "user", "content": [image_part("green"), describe]}],
    ]


def greedy(max_tokens: int = 24, ignore_eos: bool = True):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)


def chat_tokens(llm, conversations, max_tokens: int = 24, ignore_eos: bool = True) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.chat(conversations, greedy(max_tokens, ignore_eos))]


def engine_metrics(llm) -> dict:
    return {m.name: getattr(m, "value", None) for m in llm.get_metrics()}


def model_runner_of(llm):
    """The in-process model runner (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


@pytest.fixture(scope="module")
def fixed_number_of_draft_tokens():
    """Load-adaptive speculation off for a module's engines (`pytestmark = pytest.mark.usefixtures(
    "fixed_number_of_draft_tokens")`): every step drafts the configured K."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VISPEC_VLLM_ADAPTIVE", "0")
        yield

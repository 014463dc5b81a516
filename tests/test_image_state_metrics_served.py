"""`vispec:image_state_misses_total` on a real server's /metrics (tiny LLaVA, CPU, 127.0.0.1).

The miss happens in the engine-core process (the proposer, uni executor) and the counter lives in
the API-server process, so this checks the whole route of patches/image_state_metrics.py across
vLLM's process boundary. Same scenario as tests/test_image_state_misses.py: the proposer keeps one
image and the encoder cache two; images A, B, C, then A again from the prefix cache.
"""

from __future__ import annotations

import pytest
from conftest import make_image

from vispec_vllm.demo.server import VLLMServer, image_data_url, metric_samples

pytestmark = pytest.mark.server

DESCRIBE = {"type": "text", "text": "Describe the image in detail. Say which shapes you see, their colours, sizes "
                                    "and positions, and count the objects on the left and on the right."}
IMAGES = [("red", "ellipse"), ("blue", "rectangle"), ("green", "ellipse"), ("red", "ellipse")]  # A, B, C, A


def misses(metrics_text: str) -> float | None:
    """The API server's count, or None when it does not export the counter at all."""
    samples = metric_samples(metrics_text, "vispec:image_state_misses_total")
    return sum(value for _, value in samples) if samples else None


def test_misses_reach_the_api_servers_metrics(tiny_models, tmp_path):
    # Blocks of 32 tokens, so that the 84-token prompts hit the prefix cache on the image's block.
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--block-size", "32",
            "--max-num-batched-tokens", "32", "--speculative-model", str(tiny_models / "tiny-llava-vispec"),
            "--num-speculative-tokens", "3"]
    env = {"VISPEC_VLLM_IMAGE_STATE_CAPACITY": "1", "VISPEC_VLLM_ADAPTIVE": "0"}
    with VLLMServer(tiny_models / "tiny-llava", args, log_path=tmp_path / "server.log", startup_timeout_s=300,
                    env=env) as server:
        counts = []
        for colour, shape in IMAGES:  # one at a time, so that the caches evict in this order
            image = {"type": "image_url", "image_url": {"url": image_data_url(make_image(colour, shape))}}
            status, body = server.chat([image, DESCRIBE], max_tokens=8)
            assert status == 200, body
            counts.append(misses(server.metrics()))
    assert counts[:3] == [0.0, 0.0, 0.0]
    assert counts[3] >= 1.0

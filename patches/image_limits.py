"""Patch: an image past PIL's decompression-bomb limit is a bad request (HTTP 400), not a 500.

vLLM function: `vllm.multimodal.media.image.ImageMediaIO.load_bytes` (vLLM 0.32.0) turns PIL's
`OSError` / `UnidentifiedImageError` into `ValueError` (which the OpenAI server answers with 400),
but not `PIL.Image.DecompressionBombError`, raised by `Image.open` for images over twice
`Image.MAX_IMAGE_PIXELS`; such a request got "500 Internal Server Error". The wrapper gives it the
same `ValueError` path, with a message naming the size and the limit. Applied in every process
the plugin loads in (it concerns serving, with or without speculation).
"""

from __future__ import annotations

from vispec_vllm.patches._wrap import wrap


def _make_load_bytes(original_load_bytes):
    from PIL import Image

    def load_bytes(self, data: bytes):
        try:
            return original_load_bytes(self, data)
        except Image.DecompressionBombError as err:
            raise ValueError(f"Image too large: {err}") from err

    return load_bytes


def apply() -> None:
    from vllm.multimodal.media.image import ImageMediaIO

    wrap(ImageMediaIO, "load_bytes", _make_load_bytes)

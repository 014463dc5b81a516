"""Everything the ViSpec proposer keeps from one engine step to the next (docs/method.md §6.3).

- Per image hash, the adaptor's output for the image (its compressed tokens, and its global image
  feature g as the draft adds it to a text row: the global image term, see
  `ViSpecDraftModel.compress_image`), least recently used first and bounded: later prefill chunks
  and prefix-cache hits, where the encoder does not run again, still find it.
- Per running request that has images, once its rows lie past its last image's rows ("settled"),
  the g (term) every later row fuses; and, per row of vLLM's input batch, the position from which the
  row's request is settled and that g as one device tensor, so that a decode step needs no
  per-request Python work. Re-derived only when the batch's requests or their order change; a
  request's entry is freed when it leaves.
- Per settled request, the KV blocks that hold only its dropped image rows, and the view of the
  block table without them that the draft's attention reads (`key_blocks_read`), rebuilt only when
  the rows that skip blocks change.
- The count of image-state misses (an image needed after it left both this state and vLLM's
  encoder cache), the one warning about them, and when the state was last logged.

No vLLM import: requests are read through the attributes the proposer hands over.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from vispec_vllm.row_plan import ImageSpan, key_block_index

logger = logging.getLogger("vllm.vispec_vllm")

IMAGE_MODALITIES = ("image", "video")  # ViSpec treats a video's tokens as one image run
# How often the proposer logs the size of its state (operators watch it for leaks).
STATE_LOG_INTERVAL_S = float(os.environ.get("VISPEC_VLLM_STATE_LOG_INTERVAL_S", "60"))
# VISPEC_VLLM_TIME_DRAFT=1: time the proposer's drafting (the state log line reports it).
DRAFT_TIMING_ENV = "VISPEC_VLLM_TIME_DRAFT"
DRAFT_TIMING_PATTERN = re.compile(r"drafting ([0-9.]+) ms per draft forward over ([0-9]+) forwards")
IMAGE_STATE_CAPACITY_ENV = "VISPEC_VLLM_IMAGE_STATE_CAPACITY"
# A batch row whose request has images but no known decode g yet.
NOT_SETTLED = np.iinfo(np.int64).max


def image_state_capacity(max_num_seqs: int) -> int:
    """Images whose compressed state the proposer keeps (LRU): the env var, else 8 per sequence, >= 4096."""
    value = os.environ.get(IMAGE_STATE_CAPACITY_ENV)
    if value is None:
        return max(4096, max_num_seqs * 8)
    try:
        capacity = int(value)
    except ValueError:
        capacity = 0
    if capacity < 1:
        raise ValueError(f"{IMAGE_STATE_CAPACITY_ENV}={value!r}: expected a positive number of images")
    return capacity


def request_image_spans(mm_features, request: int = 0) -> list[ImageSpan]:
    """The images of one request (vLLM's `mm_features`), by offset, as the batch's request `request`."""
    spans = [ImageSpan(f.mm_position.offset, f.mm_position.length, request, f.identifier)
             for f in mm_features or () if f.modality in IMAGE_MODALITIES]
    return sorted(spans, key=lambda span: span.offset)


@dataclass
class DraftTiming:
    """Wall time of every propose() call of a decode step (the device synchronised on both sides),
    and the draft forwards made in them (K per call): the cost of one drafted token, everything
    included (the row buffers, K forwards with the LM head and argmax, vLLM's chain bookkeeping)."""

    seconds: float = 0.0
    forwards: int = 0

    def add(self, seconds: float, forwards: int) -> None:
        self.seconds += seconds
        self.forwards += forwards

    def summary(self) -> str:
        """Parsed back by DRAFT_TIMING_PATTERN (the demo reads it from the server log)."""
        per_forward_ms = 1e3 * self.seconds / self.forwards if self.forwards else 0.0
        return f"drafting {per_forward_ms:.4f} ms per draft forward over {self.forwards} forwards"


@dataclass
class CompressedImage:
    compressed_tokens: torch.Tensor  # [num_q-1, H]
    global_image_term: torch.Tensor  # [H]: g as it enters a text row


def image_tables(images: list[CompressedImage | None], num_compressed: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tables the row plan indexes, for the images of one step in order: the global image
    term of image k at row k, and its compressed tokens at rows k * num_compressed + j; each with a
    zero last row (index -1: no image). An image without state (None) reads as zero."""
    zero = torch.zeros(hidden_size, dtype=dtype, device=device)
    no_image = CompressedImage(torch.zeros(num_compressed, hidden_size, dtype=dtype, device=device), zero)
    tables = [no_image if image is None else image for image in images]
    return (torch.stack([image.global_image_term for image in tables] + [zero]),
            torch.cat([image.compressed_tokens for image in tables] + [zero[None]]))


NO_BLOCKS = np.zeros(0, dtype=np.int64)


@dataclass
class SettledRequest:
    """From token position `from_position` on, every row of the request fuses `global_image_term`;
    its draft attention may skip `dropped_key_blocks` (vispec_vllm/row_plan.py `dropped_key_blocks`)."""

    from_position: int
    global_image_term: torch.Tensor  # [H]
    dropped_key_blocks: np.ndarray = field(default_factory=lambda: NO_BLOCKS)


@dataclass(frozen=True)
class KeyBlocksRead:
    """The draft attention's view of the batch's block table for one set of rows (see
    `ViSpecProposerState.key_blocks_read`)."""

    active_rows: bytes  # the rows it applies to, as a bool mask's bytes (the cache key)
    width: int
    index: torch.Tensor  # [rows, width] block index into each row of the block table
    skipped_rows: torch.Tensor  # [rows] keys left out per row (blocks x block size), int32 as seq_lens
    skipped_rows_cpu: torch.Tensor  # the same on the CPU


@dataclass
class ProposeCall:
    """What one propose() call works out at one draft forward and its later forwards reuse; the
    proposer starts a new one every call."""

    # The step's key-block view and the block table it reads (None: every row reads every
    # block), set at the first forward: the chain's forwards read the same block table.
    key_blocks: tuple[KeyBlocksRead, torch.Tensor] | None = None
    # The chain's rows are written before its first step and stay for the rest.
    chain_rows_written: bool = False


class ViSpecProposerState:
    """Everything the proposer keeps between steps."""

    def __init__(self, capacity: int, max_batch_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.capacity = capacity
        # Compressed state per image hash, least recently used first.
        self.images: OrderedDict[str, CompressedImage] = OrderedDict()
        # Running requests with images whose decode g is known; freed when a request leaves.
        self.settled: dict[str, SettledRequest] = {}
        # Images a step needed whose state was in neither the proposer's nor the encoder's cache.
        self.image_state_misses = 0
        self.reported_image_state_misses = 0
        self.missing_image_warned = False
        self.logged_at = time.monotonic()
        # What drafting costs, when asked for (DRAFT_TIMING_ENV).
        self.draft_timing = DraftTiming() if os.environ.get(DRAFT_TIMING_ENV, "0") == "1" else None
        # Per row of vLLM's input batch, as of `batch_req_ids` (re-derived when that changes):
        # the position from which the row's request is settled (0: no image; NOT_SETTLED) and its g.
        self.batch_req_ids: list[str] = []
        self.settled_from = np.full(max_batch_size, NOT_SETTLED, dtype=np.int64)
        self.decode_global_image_term = torch.zeros(max_batch_size, hidden_size, dtype=dtype, device=device)
        # Per row: the KV blocks of dropped image rows its settled request's attention may skip; and
        # the view of the block table built from them, kept while the rows that skip stay the same.
        self.dropped_key_blocks: list[np.ndarray] = [NO_BLOCKS] * max_batch_size
        self.skips_key_blocks = np.zeros(max_batch_size, dtype=bool)
        self.key_blocks: KeyBlocksRead | None = None
        self.device = device

    def remember(self, mm_hash: str, image: CompressedImage) -> None:
        self.images[mm_hash] = image
        self.images.move_to_end(mm_hash)
        while len(self.images) > self.capacity:
            self.images.popitem(last=False)

    def lookup(self, mm_hash: str) -> CompressedImage | None:
        image = self.images.get(mm_hash)
        if image is not None:
            self.images.move_to_end(mm_hash)
        return image

    def compressed_images(self, hashes: Mapping[int, str], encoder_cache: Mapping[str, torch.Tensor],
                          compress: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                          ) -> dict[int, CompressedImage]:
        """Image index -> compressed state, for the images found here or in vLLM's encoder cache
        (compressed by `compress` on first use); each missing image counts as one miss."""
        found: dict[int, CompressedImage] = {}
        by_hash: dict[str, CompressedImage | None] = {}
        for index, mm_hash in hashes.items():
            if mm_hash not in by_hash:
                by_hash[mm_hash] = self._compressed_image(mm_hash, encoder_cache, compress)
            if by_hash[mm_hash] is not None:
                found[index] = by_hash[mm_hash]
        return found

    def _compressed_image(self, mm_hash: str, encoder_cache: Mapping[str, torch.Tensor],
                          compress: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                          ) -> CompressedImage | None:
        image = self.lookup(mm_hash)
        if image is not None:
            return image
        image_embeds = encoder_cache.get(mm_hash)
        if image_embeds is None:
            self._count_miss(mm_hash)
            return None
        with torch.inference_mode():
            image = CompressedImage(*compress(image_embeds))
        self.remember(mm_hash, image)
        return image

    def _count_miss(self, mm_hash: str) -> None:
        # Only after the image's features left both caches (evicted, and a prefix-cache hit
        # skipped the encoder): drafts lose the image, outputs stay the target's.
        self.image_state_misses += 1
        if not self.missing_image_warned:
            logger.warning("ViSpec: no features for image %s (evicted from the proposer's state, capacity %d, and "
                           "from the encoder cache); drafting without it. Further misses are counted in "
                           "vispec:image_state_misses_total and the state log line", mm_hash, self.capacity)
            self.missing_image_warned = True

    def sync_batch(self, req_ids: list[str], requests: Mapping) -> None:
        """Re-derive the per-row state of the rows whose request changed (a request joined, left or
        moved: vLLM fills holes and condenses, so on a step with prefill rows most rows keep theirs).
        A row that keeps its request keeps its state: its settled position and g are the request's,
        and an unsettled row is planned on every step, which rewrites its g."""
        previous = self.batch_req_ids
        if req_ids == previous:
            return
        self.batch_req_ids = list(req_ids)
        self.key_blocks = None
        for req_id in [r for r in self.settled if r not in requests]:
            del self.settled[req_id]
        changed = [row for row, req_id in enumerate(req_ids) if row >= len(previous) or previous[row] != req_id]
        settled_rows, features = [], []
        for row in changed:
            req_id = req_ids[row]
            entry = self.settled.get(req_id)
            self.dropped_key_blocks[row] = NO_BLOCKS if entry is None else entry.dropped_key_blocks
            self.skips_key_blocks[row] = self.dropped_key_blocks[row].size > 0
            if entry is not None:
                self.settled_from[row] = entry.from_position
                settled_rows.append(row)
                features.append(entry.global_image_term)
                continue
            # Not settled: a request with images is planned on its next step, which writes its g; a
            # text-only one fuses zero from position 0.
            self.settled_from[row] = NOT_SETTLED if request_image_spans(requests[req_id].mm_features) else 0
            self.decode_global_image_term[row].zero_()
        if settled_rows:
            self.decode_global_image_term[settled_rows] = torch.stack(features)

    def settle(self, row: int, req_id: str, from_position: int, global_image_term: torch.Tensor,
               dropped_key_blocks: np.ndarray = NO_BLOCKS) -> None:
        self.settled[req_id] = SettledRequest(from_position, global_image_term.clone(), dropped_key_blocks)
        self.settled_from[row] = from_position
        self.decode_global_image_term[row] = global_image_term
        self.dropped_key_blocks[row] = dropped_key_blocks
        self.skips_key_blocks[row] = dropped_key_blocks.size > 0
        self.key_blocks = None

    def key_blocks_read(self, window_start: np.ndarray, num_rows: int, width: int, block_size: int,
                        ) -> KeyBlocksRead | None:
        """How the draft attention reads the first `num_rows` rows of a block table `width` blocks
        wide, or None where it reads every block: a row whose request had settled before this step's
        window (`window_start`, its first query position) skips its dropped key blocks, which lie
        before every query of the row. A row that settles during this step still has query rows
        among its image rows, so it reads every block until its next step."""
        rows = min(len(self.batch_req_ids), num_rows)
        if not self.skips_key_blocks[:rows].any():  # the common case without whole dropped blocks: no work
            return None
        active = np.zeros(num_rows, dtype=bool)
        active[:rows] = self.skips_key_blocks[:rows] & (self.settled_from[:rows] <= window_start[:rows])
        if not active.any():
            return None
        key = active.tobytes()
        if self.key_blocks is None or self.key_blocks.active_rows != key or self.key_blocks.width != width:
            index, skipped = key_block_index([self.dropped_key_blocks[row] if active[row] else NO_BLOCKS
                                              for row in range(num_rows)], width)
            skipped_rows = torch.from_numpy((skipped * block_size).astype(np.int32))
            self.key_blocks = KeyBlocksRead(key, width, torch.from_numpy(index).to(self.device),
                                            skipped_rows.to(self.device), skipped_rows)
        return self.key_blocks

    def take_new_image_state_misses(self) -> int:
        new = self.image_state_misses - self.reported_image_state_misses
        self.reported_image_state_misses = self.image_state_misses
        return new

    def summary(self) -> str:
        images = len(self.images)
        tensor_bytes = sum(t.nbytes for image in self.images.values()
                           for t in (image.compressed_tokens, image.global_image_term))
        tensor_bytes += sum(entry.global_image_term.nbytes for entry in self.settled.values())
        return (f"ViSpec proposer state: {len(self.settled)} requests with image state, {images} cached images "
                f"(capacity {self.capacity}), {2 * images + len(self.settled)} cached tensors "
                f"({tensor_bytes / 2**20:.1f} MiB), {self.image_state_misses} image-state misses"
                + (f"; {self.draft_timing.summary()}" if self.draft_timing is not None else ""))

    def log_summary_now_and_then(self) -> None:
        if time.monotonic() - self.logged_at >= STATE_LOG_INTERVAL_S:
            logger.info("%s", self.summary())
            self.logged_at = time.monotonic()

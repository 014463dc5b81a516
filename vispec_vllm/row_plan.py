"""The row plan of ViSpec drafting: what each draft input row is (the paper, §3).

Row i of a request pairs the target's hidden state h_i with the next token x_{i+1}, at RoPE
position i. For an image at token positions [o, o+L):

- its image rows are [o-1, o+L-1); the last num_q-1 of them hold the adaptor's compressed tokens
  (token j of num_q-1 at row o+L-1-(num_q-1)+j), the others are dropped;
- rows from o+L-1 until the next image's first row fuse this image's global feature g;
- rows before the request's first image fuse zero, and decode rows (past the prompt) fuse g of
  the prompt's last image: the same rule, since no image follows.

num_q = 1 (no compressed token) drops every image row. With `keep_image_rows` (the ablation of a
draft trained with no image row dropped; config key `vispec_keep_image_rows`,
vispec_vllm/checkpoint_format.py) no row is dropped: the image rows that would be dropped stay as
text rows fusing zero, as every image row does; the compressed rows and every row's g are the same.

`plan_rows` applies these rules to a batch of token windows at once: one pass over the images,
each filling its slices of rows (no Python loop over rows or over requests without images). It runs
on every engine step with prefill rows, for the few images the step's windows touch; in NumPy, a
slice fill costs about a microsecond, where the earlier search-based plan over every row with torch
ops cost about 0.3 ms a step. Both the runtime proposer (vispec_vllm/proposer.py)
and training (vispec_vllm/training/train.py) use it, describing images as `ImageSpan`s. No vLLM
import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSpan:
    """One image: token positions [offset, offset + length) of the batch's request `request`.

    mm_hash names the image where the caller has a name for it (vLLM's multimodal hash, under which
    the runtime keeps the image's compressed state); the plan itself does not read it.
    """

    offset: int
    length: int
    request: int = 0
    mm_hash: str | None = None

    @property
    def first_row(self) -> int:
        """The image's first row: it pairs the token before the image with the first image token."""
        return self.offset - 1

    @property
    def end_row(self) -> int:
        """First row after the image's rows: it pairs the last image token's hidden state."""
        return self.offset + self.length - 1

    def first_compressed_row(self, num_q: int) -> int:
        """The first of the image's last num_q-1 rows, which hold its compressed tokens; the image
        rows before it are the dropped ones (unless image rows are kept)."""
        return max(self.end_row - (num_q - 1), self.first_row)


@dataclass(frozen=True)
class RowPlan:
    """What each row of a batch of windows is.

    is_dropped:            [rows] bool, an image row that holds no compressed token (none when
                           image rows are kept)
    compressed_index:      [rows] index into the flat table of the batch's compressed tokens
                           (image k's token j at k * (num_q - 1) + j), or -1
    global_feature_source: [rows] the image whose g the row fuses, or -1 for zero (no image before
                           the row, or an image row: dropped or compressed, its input does not go
                           through img_fc; kept as a text row, it fuses zero)
    following_global_feature_source: [requests] the same for the row just after each window
                           (position = window end), which the next draft rows fuse
    referenced_images:     the images whose compressed tokens or g some row (or following row) takes,
                           ascending: the only ones whose adaptor output the rows need
    """

    is_dropped: torch.Tensor
    compressed_index: torch.Tensor
    global_feature_source: torch.Tensor
    following_global_feature_source: torch.Tensor
    referenced_images: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Window:
    """One request's window: token positions [start, end), laid out from flat row first_flat_row."""

    start: int
    end: int
    first_flat_row: int

    def rows(self, lo: int, hi: int) -> slice:
        """The flat rows of the window's positions in [lo, hi) (an empty slice when none)."""
        lo = max(lo, self.start)
        hi = max(min(hi, self.end), lo)
        return slice(self.first_flat_row + lo - self.start, self.first_flat_row + hi - self.start)


def plan_rows(images: Sequence[ImageSpan], num_q: int, query_start: torch.Tensor | np.ndarray,
              window_start: torch.Tensor | np.ndarray, keep_image_rows: bool = False) -> RowPlan:
    """The row plan of a flat batch of windows (with `keep_image_rows`, one in which no row is dropped).

    Request r computes the rows at token positions [window_start[r], window_start[r] + n_r), laid
    out at flat rows [query_start[r], query_start[r+1]) with n_r = query_start[r+1] - query_start[r]
    (query_start[0] = 0). Images may come in any order; an image's index in `images` is its index
    in the plan. Images of one request must not overlap. Both on the CPU, integer dtypes; the plan's
    tensors are CPU tensors.
    """
    if num_q < 1:
        raise ValueError(f"num_q must be >= 1 (the adaptor's last query is the global feature), got {num_q}")
    query_start = np.asarray(query_start, dtype=np.int64)
    window_start = np.asarray(window_start, dtype=np.int64)
    if query_start.size != window_start.size + 1 or int(query_start[0]) != 0:
        raise ValueError("query_start must hold one more entry than window_start and start at 0")
    num_rows, num_compressed = int(query_start[-1]), num_q - 1
    is_dropped = np.zeros(num_rows, dtype=bool)
    compressed_index = np.full(num_rows, -1, dtype=np.int64)
    global_feature_source = np.full(num_rows, -1, dtype=np.int64)
    following = np.full(window_start.size, -1, dtype=np.int64)

    referenced = []
    order = sorted(range(len(images)), key=lambda k: (images[k].request, images[k].offset))
    for n, k in enumerate(order):
        image = images[k]
        # Only the windows of requests with images are read (the proposer plans a whole batch).
        start, first_flat_row = int(window_start[image.request]), int(query_start[image.request])
        window = _Window(start, start + int(query_start[image.request + 1]) - first_flat_row, first_flat_row)
        next_image = images[order[n + 1]] if n + 1 < len(order) else None
        is_last = next_image is None or next_image.request != image.request
        # Text rows fuse this image's g up to the next image's first row.
        next_first_row = window.end if is_last else next_image.offset - 1
        first_row, end_row, compressed_from = image.first_row, image.end_row, image.first_compressed_row(num_q)
        if not keep_image_rows:
            is_dropped[window.rows(first_row, compressed_from)] = True
        compressed_rows = window.rows(compressed_from, end_row)
        # Token j of num_q-1 at row end_row - (num_q-1) + j.
        positions = np.arange(compressed_rows.start, compressed_rows.stop) - window.first_flat_row + window.start
        compressed_index[compressed_rows] = k * num_compressed + num_compressed - end_row + positions
        text_rows = window.rows(end_row, next_first_row)
        global_feature_source[text_rows] = k
        is_following = end_row <= window.end and (is_last or window.end < next_first_row)
        if is_following:
            following[image.request] = k
        if compressed_rows.stop > compressed_rows.start or text_rows.stop > text_rows.start or is_following:
            referenced.append(k)
    return RowPlan(*map(torch.from_numpy, (is_dropped, compressed_index, global_feature_source, following)),
                   referenced_images=tuple(sorted(referenced)))


def dropped_key_blocks(images: Sequence[ImageSpan], num_q: int, block_size: int,
                       keep_image_rows: bool = False) -> np.ndarray:
    """The KV-cache blocks of one request every row of which is a dropped image row, ascending.

    The draft's key at position p sits in slot p, so block b holds the keys of positions
    [b * block_size, (b + 1) * block_size). A query past the image gives such a block's keys zero
    weight (the key-mask channel), so the draft's attention may skip the whole block: the same
    output, fewer keys read.
    """
    if keep_image_rows:
        return np.zeros(0, dtype=np.int64)
    blocks = [np.arange(-(-image.first_row // block_size), image.first_compressed_row(num_q) // block_size)
              for image in images]
    if len(blocks) == 1:  # one image: its blocks are already ascending and distinct
        return blocks[0]
    return np.unique(np.concatenate(blocks)) if blocks else np.zeros(0, dtype=np.int64)


def key_block_index(dropped_blocks: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per request (a row of a block table `width` blocks wide): the index of each block its
    attention reads, its dropped blocks left out and the rest in order (the tail repeats the last
    block; no query reads past its shortened length), and the number of blocks left out.
    `table.gather(1, index)` is the table of the blocks read; each sequence is that many blocks
    times the block size shorter. A request all of whose blocks are dropped reads them all."""
    num_requests = len(dropped_blocks)
    is_dropped = np.zeros((num_requests, width), dtype=bool)
    counts = np.fromiter((blocks.size for blocks in dropped_blocks), dtype=np.int64, count=num_requests)
    if counts.any():
        blocks = np.concatenate(dropped_blocks)
        request = np.repeat(np.arange(num_requests), counts)
        inside = blocks < width
        is_dropped[request[inside], blocks[inside]] = True
    is_dropped[is_dropped.all(axis=1)] = False
    skipped = is_dropped.sum(axis=1)
    # A stable sort by the dropped flag puts each row's kept blocks first, in order.
    index = np.argsort(is_dropped, axis=1, kind="stable")
    last_kept = np.take_along_axis(index, np.maximum(width - skipped - 1, 0)[:, None], axis=1)
    tail = np.arange(width) >= (width - skipped)[:, None]
    return np.where(tail, last_kept, index), skipped

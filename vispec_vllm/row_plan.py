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

`plan_rows` applies these rules to a batch of token windows at once, with tensor ops only (no
Python loop over rows, requests or images). Both the runtime proposer (vispec_vllm/proposer.py)
and training (vispec_vllm/training/train.py) use it, describing images as `ImageSpan`s. No vLLM
import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Row keys are request * _REQUEST_STRIDE + (position + 1): ordered by request, then position, and
# non-negative for position -1 (the row before an image at offset 0).
_REQUEST_STRIDE = 1 << 32


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
    def end_row(self) -> int:
        """First row after the image's rows: it pairs the last image token's hidden state."""
        return self.offset + self.length - 1


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
    """

    is_dropped: torch.Tensor
    compressed_index: torch.Tensor
    global_feature_source: torch.Tensor
    following_global_feature_source: torch.Tensor


def _latest(sorted_keys: torch.Tensor, sorted_request: torch.Tensor, keys: torch.Tensor,
            request: torch.Tensor) -> torch.Tensor:
    """Per key, the index of the last sorted key <= it that belongs to the same request, or -1."""
    index = torch.searchsorted(sorted_keys, keys, right=True) - 1
    same_request = (index >= 0) & (sorted_request[index.clamp(min=0)] == request)
    return torch.where(same_request, index, -1)


def _plan_positions(spans: torch.Tensor, num_q: int, keep_image_rows: bool, request: torch.Tensor,
                    position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(is_dropped, compressed_index, global_feature_source) of the rows at (request, position);
    spans: [images, 3] (request, offset, length)."""
    if spans.shape[0] == 0:
        no_image = torch.full_like(position, -1)
        return torch.zeros_like(position, dtype=torch.bool), no_image, no_image
    num_compressed = num_q - 1
    span_request, offset, length = spans.unbind(1)
    first_row_key = span_request * _REQUEST_STRIDE + offset  # the key of row offset - 1
    order = torch.argsort(first_row_key, stable=True)  # by request, then offset
    sorted_request, sorted_end_row = span_request[order], (offset + length - 1)[order]
    row_key = request * _REQUEST_STRIDE + position + 1

    # The image whose rows start last at or before the row: the row is one of that image's rows
    # if it lies before the image's end row.
    started = _latest(first_row_key[order], sorted_request, row_key, request)
    started_end_row = sorted_end_row[started.clamp(min=0)]
    is_image_row = (started >= 0) & (position < started_end_row)
    token = num_compressed - (started_end_row - position)  # its compressed token, when >= 0
    is_compressed = is_image_row & (token >= 0)
    compressed_index = torch.where(is_compressed, order[started.clamp(min=0)] * num_compressed + token, -1)

    # The image whose end row is the last at or before the row: a text row fuses its g.
    end_row_key = sorted_request * _REQUEST_STRIDE + sorted_end_row + 1
    ended = _latest(end_row_key, sorted_request, row_key, request)
    global_feature_source = torch.where((ended >= 0) & ~is_image_row, order[ended.clamp(min=0)], -1)
    # Kept, an image row without a compressed token is a text row; it fuses zero like every image row.
    is_dropped = torch.zeros_like(is_image_row) if keep_image_rows else is_image_row & ~is_compressed
    return is_dropped, compressed_index, global_feature_source


def plan_rows(images: Sequence[ImageSpan], num_q: int, query_start: torch.Tensor,
              window_start: torch.Tensor, keep_image_rows: bool = False) -> RowPlan:
    """The row plan of a flat batch of windows (with `keep_image_rows`, one in which no row is dropped).

    Request r computes the rows at token positions [window_start[r], window_start[r] + n_r), laid
    out at flat rows [query_start[r], query_start[r+1]) with n_r = query_start[r+1] - query_start[r]
    (query_start[0] = 0). Images may come in any order; an image's index in `images` is its index
    in the plan. Images of one request must not overlap. Both tensors on one device (the runtime
    plans on CPU); integer dtypes.
    """
    if num_q < 1:
        raise ValueError(f"num_q must be >= 1 (the adaptor's last query is the global feature), got {num_q}")
    query_start = query_start.long()
    window_start = window_start.long()
    spans = torch.tensor([(image.request, image.offset, image.length) for image in images], dtype=torch.long,
                         device=window_start.device).reshape(-1, 3)
    if query_start.numel() != window_start.numel() + 1 or int(query_start[0]) != 0:
        raise ValueError("query_start must hold one more entry than window_start and start at 0")
    num_requests = window_start.numel()
    rows_per_request = query_start[1:] - query_start[:-1]
    num_rows = int(query_start[-1])
    requests = torch.arange(num_requests, device=window_start.device)
    row_request = torch.repeat_interleave(requests, rows_per_request, output_size=num_rows)
    row = torch.arange(num_rows, device=window_start.device)
    position = window_start[row_request] + row - query_start[row_request]
    is_dropped, compressed_index, global_feature_source = _plan_positions(spans, num_q, keep_image_rows, row_request,
                                                                          position)
    *_, following = _plan_positions(spans, num_q, keep_image_rows, requests, window_start + rows_per_request)
    return RowPlan(is_dropped, compressed_index, global_feature_source, following)

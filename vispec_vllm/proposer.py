"""ViSpecProposer: vLLM's EAGLE proposer (V1 model runner) feeding a ViSpec draft.

Per step it tells the draft, row by row, which rows are dropped image rows, which rows hold the
adaptor's compressed tokens, and which global image feature g each row fuses; then vLLM's own
EAGLE chain drafting runs unchanged. Draft positions are the raw 1-D token index for every target
(for M-RoPE targets this also avoids vLLM issue #54498).

Row i of a request pairs h_i with x_{i+1}. For an image occupying token positions [o, o+L):
- image rows are [o-1, o+L-1); the last num_q-1 of them hold the compressed tokens, the others
  are dropped (their keys masked out of every query, now and in later steps);
- rows from o+L-1 until the next image's rows fuse this image's g; rows before any image fuse 0;
- decode rows fuse g of the prompt's last image.

State that must survive a step lives in `ViSpecProposerState`: g and compressed tokens per image
hash (so later chunks and prefix-cache hits, where the encoder does not run again, still find
them), and per running request the g its decode rows fuse, freed when the request leaves.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from vllm.config import VllmConfig
from vllm.v1.spec_decode.eagle import EagleProposer

from vispec_vllm.draft_model import ViSpecDraftModel, ViSpecRowInputs

logger = logging.getLogger("vllm.vispec_vllm")

IMAGE_MODALITIES = ("image", "video")  # ViSpec treats a video's tokens as one image run
# How often the proposer logs the size of its state (operators watch it for leaks).
STATE_LOG_INTERVAL_S = float(os.environ.get("VISPEC_VLLM_STATE_LOG_INTERVAL_S", "60"))


@dataclass(frozen=True)
class ImageSpan:
    """One image in a request: token positions [offset, offset + length), keyed by its mm hash."""

    offset: int
    length: int
    mm_hash: str

    @property
    def first_row(self) -> int:  # the row whose next token is the first image token
        return self.offset - 1

    @property
    def end_row(self) -> int:  # first text row after the image: pairs the last image token's h
        return self.offset + self.length - 1


@dataclass
class CompressedImage:
    compressed_tokens: torch.Tensor  # [num_q-1, H]
    global_image_feature: torch.Tensor  # [H]


@dataclass
class ViSpecProposerState:
    """Everything the proposer keeps between steps."""

    capacity: int
    images: OrderedDict[str, CompressedImage] = field(default_factory=OrderedDict)
    # g fused by each running request's decode rows (the last image of its prompt).
    decode_global_image_feature: dict[str, torch.Tensor] = field(default_factory=dict)

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

    def forget_finished(self, running_req_ids) -> None:
        for req_id in [r for r in self.decode_global_image_feature if r not in running_req_ids]:
            del self.decode_global_image_feature[req_id]

    def summary(self) -> str:
        return (f"ViSpec proposer state: {len(self.decode_global_image_feature)} requests with image state, "
                f"{len(self.images)} cached images (capacity {self.capacity})")


def image_spans(mm_features) -> list[ImageSpan]:
    spans = [ImageSpan(f.mm_position.offset, f.mm_position.length, f.identifier)
             for f in mm_features or () if f.modality in IMAGE_MODALITIES]
    return sorted(spans, key=lambda s: s.offset)


class ViSpecProposer(EagleProposer):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        self.runner = runner
        spec = vllm_config.speculative_config
        if vllm_config.model_config.uses_mrope and spec.disable_padded_drafter_batch:
            raise ValueError("ViSpec drafts for M-RoPE targets (Qwen2.5-VL) need vLLM's padded drafter batch; "
                             "remove disable_padded_drafter_batch from the speculative config")
        max_images = vllm_config.scheduler_config.max_num_seqs * 8
        self.state = ViSpecProposerState(capacity=max(4096, max_images))
        self._missing_image_warned = False
        self._step_attn_metadata = None
        self._state_logged_at = time.monotonic()
        # g of each request's decode rows, for the chain steps of the current propose().
        self._decode_rows_g = torch.zeros(self.max_batch_size, self.hidden_size, dtype=self.dtype, device=device)

    # -- positions: the draft always uses the raw 1-D token index ------------------------------
    def _set_positions(self, num_tokens: int, positions: torch.Tensor) -> None:
        if positions.dim() == 2:  # M-RoPE target: the runner keeps the 1-D index beside it
            positions = self.runner.positions[:num_tokens]
        self.positions[:num_tokens] = positions

    # -- one propose() = first pass over this step's rows + the chain of decode rows ------------
    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None) -> torch.Tensor:
        self._step_attn_metadata = common_attn_metadata
        try:
            return super().propose(
                num_speculative_tokens, target_token_ids, target_positions, target_hidden_states, next_token_ids,
                token_indices_to_sample, common_attn_metadata, sampling_metadata, mm_embed_inputs=mm_embed_inputs,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu, slot_mappings=slot_mappings)
        finally:
            self.draft.row_inputs = None
            self._step_attn_metadata = None

    @property
    def draft(self) -> ViSpecDraftModel:
        return self.model

    def build_model_inputs_first_pass(self, num_tokens, num_input_tokens, mm_embed_inputs):
        self.draft.row_inputs = self._first_pass_row_inputs(num_tokens, num_input_tokens)
        return super().build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)

    def _update_positions_dependent_metadata(self, positions, common_attn_metadata, batch_size,
                                             input_batch_size, block_size):
        # Chain steps: one row per request, each fusing g of its prompt's last image.
        self.draft.row_inputs = ViSpecRowInputs(global_image_feature=self._decode_rows_g[:input_batch_size])
        return super()._update_positions_dependent_metadata(positions, common_attn_metadata, batch_size,
                                                            input_batch_size, block_size)

    # -- per-row bookkeeping ---------------------------------------------------------------------
    def _compressed_image(self, mm_hash: str) -> CompressedImage | None:
        image = self.state.lookup(mm_hash)
        if image is None:
            image_embeds = self.runner.encoder_cache.get(mm_hash)
            if image_embeds is None:
                return None
            with torch.inference_mode():
                compressed, global_feature = self.draft.compress_image(image_embeds)
            image = CompressedImage(compressed, global_feature)
            self.state.remember(mm_hash, image)
        return image

    def _global_feature_or_zero(self, span: ImageSpan | None, zero: torch.Tensor) -> torch.Tensor:
        if span is None:
            return zero
        image = self._compressed_image(span.mm_hash)
        if image is None:
            # Only after the image's features left both caches (evicted, and a prefix-cache hit
            # skipped the encoder): drafts lose the image, outputs stay the target's.
            if not self._missing_image_warned:
                logger.warning("ViSpec: no features for image %s; drafting without its global feature",
                               span.mm_hash)
                self._missing_image_warned = True
            return zero
        return image.global_image_feature

    def _first_pass_row_inputs(self, num_tokens: int, num_input_tokens: int) -> ViSpecRowInputs:
        cad = self._step_attn_metadata
        batch_size = cad.num_reqs
        query_start = cad.query_start_loc_cpu[: batch_size + 1].tolist()
        hidden, dtype, device = self.draft.hidden_size, self.dtype, self.device
        num_compressed = self.draft.num_q - 1
        zero = torch.zeros(hidden, dtype=dtype, device=device)

        per_request_g = torch.zeros(batch_size, hidden, dtype=dtype, device=device)
        decode_g = torch.zeros(batch_size, hidden, dtype=dtype, device=device)
        pinned = self.state.decode_global_image_feature
        row_overrides: list[tuple[int, int, torch.Tensor]] = []  # (row_lo, row_hi, g)
        compressed_rows: list[tuple[int, torch.Tensor]] = []
        dropped_rows: list[tuple[int, int]] = []

        req_ids = self.runner.input_batch.req_ids[:batch_size]
        self.state.forget_finished(self.runner.requests)
        if time.monotonic() - self._state_logged_at >= STATE_LOG_INTERVAL_S:
            logger.info("%s", self.state.summary())
            self._state_logged_at = time.monotonic()
        for i, req_id in enumerate(req_ids):
            request = self.runner.requests.get(req_id)
            spans = image_spans(request.mm_features) if request is not None else []
            if not spans:
                continue
            row0, num_rows = query_start[i], query_start[i + 1] - query_start[i]
            start = request.num_computed_tokens
            end = start + num_rows  # rows [start, end) in token positions

            before = [s for s in spans if s.end_row <= start]
            if before and before[-1] is spans[-1] and req_id in pinned:
                per_request_g[i] = decode_g[i] = pinned[req_id]  # decode step: nothing new to look up
                continue
            per_request_g[i] = self._global_feature_or_zero(before[-1] if before else None, zero)
            for k, span in enumerate(spans):
                if span.end_row <= start or span.first_row >= end:
                    continue  # this image's rows and its boundary lie outside the window
                image = self._compressed_image(span.mm_hash)
                g = image.global_image_feature if image is not None else zero
                next_first_row = spans[k + 1].first_row if k + 1 < len(spans) else end
                text_lo, text_hi = max(span.end_row, start), min(next_first_row, end)
                if text_lo < text_hi:
                    row_overrides.append((row0 + text_lo - start, row0 + text_hi - start, g))
                compressed_lo = max(span.end_row - num_compressed, span.first_row)
                drop_lo, drop_hi = max(span.first_row, start), min(compressed_lo, end)
                if drop_lo < drop_hi:
                    dropped_rows.append((row0 + drop_lo - start, row0 + drop_hi - start))
                for pos in range(max(compressed_lo, start), min(span.end_row, end)):
                    if image is None:
                        raise RuntimeError(f"ViSpec: encoder output for image {span.mm_hash} is not available "
                                           "while its compressed row is drafted")
                    token_index = num_compressed - (span.end_row - pos)
                    compressed_rows.append((row0 + pos - start, image.compressed_tokens[token_index]))
            last = [s for s in spans if s.end_row <= end]
            if last:
                decode_g[i] = self._global_feature_or_zero(last[-1], zero)
                if last[-1] is spans[-1]:
                    pinned[req_id] = decode_g[i].clone()

        counts = torch.tensor([query_start[i + 1] - query_start[i] for i in range(batch_size)], device=device)
        row_g = torch.zeros(num_input_tokens, hidden, dtype=dtype, device=device)
        row_g[:num_tokens] = torch.repeat_interleave(per_request_g, counts, dim=0, output_size=num_tokens)
        for lo, hi, g in row_overrides:
            row_g[lo:hi] = g
        self._decode_rows_g[:batch_size] = decode_g
        if not compressed_rows and not dropped_rows:
            return ViSpecRowInputs(global_image_feature=row_g)
        compressed = torch.zeros(num_input_tokens, hidden, dtype=dtype, device=device)
        is_compressed = torch.zeros(num_input_tokens, dtype=torch.bool, device=device)
        is_dropped = torch.zeros(num_input_tokens, dtype=torch.bool, device=device)
        for row, token in compressed_rows:
            compressed[row] = token
            is_compressed[row] = True
        for lo, hi in dropped_rows:
            is_dropped[lo:hi] = True
        return ViSpecRowInputs(row_g, compressed, is_compressed, is_dropped)

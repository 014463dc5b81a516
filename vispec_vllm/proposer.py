"""ViSpecProposer: vLLM's EAGLE proposer (V1 model runner) feeding a ViSpec draft.

Per step it fills the draft's row buffers (vispec_vllm/draft_model.py) in place: for the first
pass over the step's rows from the row plan (vispec_vllm/row_plan.py: which rows are dropped
image rows, which hold the adaptor's compressed tokens, which image's global feature g each row
fuses), and for the chain of one-row-per-request steps from each request's decode g. vLLM's own
EAGLE drafting then runs unchanged. Draft positions are the raw 1-D token index for every target
(for M-RoPE targets this also avoids vLLM issue #54498).

A request is "settled" once its rows lie past its last image's rows: from then on every row it
drafts fuses the same g (its prompt's last image). Settled requests, which are all requests on a
decode step, cost no per-request Python work: their g sits in a device tensor indexed by vLLM's
input-batch row, re-derived only when the batch's requests or their order change. Only requests
whose window still touches an image (prefill chunks) are planned, reading their image spans.

State that must survive a step lives in `ViSpecProposerState`: g and compressed tokens per image
hash (so later chunks and prefix-cache hits, where the encoder does not run again, still find
them), each running request's decode g once settled, and the count of image-state misses.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.platforms import current_platform
from vllm.v1.spec_decode.eagle import EagleProposer

from vispec_vllm.draft_model import ViSpecDraftModel
from vispec_vllm.patches import image_state_metrics
from vispec_vllm.row_plan import ImageSpans, plan_rows

logger = logging.getLogger("vllm.vispec_vllm")

IMAGE_MODALITIES = ("image", "video")  # ViSpec treats a video's tokens as one image run
# How often the proposer logs the size of its state (operators watch it for leaks).
STATE_LOG_INTERVAL_S = float(os.environ.get("VISPEC_VLLM_STATE_LOG_INTERVAL_S", "60"))
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


@dataclass(frozen=True)
class ImageSpan:
    """One image in a request: token positions [offset, offset + length), keyed by its mm hash."""

    offset: int
    length: int
    mm_hash: str

    @property
    def end_row(self) -> int:  # first text row after the image: pairs the last image token's h
        return self.offset + self.length - 1


def image_spans(mm_features) -> list[ImageSpan]:
    spans = [ImageSpan(f.mm_position.offset, f.mm_position.length, f.identifier)
             for f in mm_features or () if f.modality in IMAGE_MODALITIES]
    return sorted(spans, key=lambda s: s.offset)


@dataclass
class CompressedImage:
    compressed_tokens: torch.Tensor  # [num_q-1, H]
    global_image_feature: torch.Tensor  # [H]


@dataclass
class SettledRequest:
    """From token position `from_position` on, every row of the request fuses `global_image_feature`."""

    from_position: int
    global_image_feature: torch.Tensor  # [H]


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
        # Per row of vLLM's input batch, as of `batch_req_ids` (re-derived when that changes):
        # the position from which the row's request is settled (0: no image; NOT_SETTLED) and its g.
        self.batch_req_ids: list[str] = []
        self.settled_from = np.full(max_batch_size, NOT_SETTLED, dtype=np.int64)
        self.decode_global_image_feature = torch.zeros(max_batch_size, hidden_size, dtype=dtype, device=device)

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

    def sync_batch(self, req_ids: list[str], requests: dict) -> None:
        """Re-derive the per-row state if the input batch's requests or their order changed."""
        if req_ids == self.batch_req_ids:
            return
        self.batch_req_ids = list(req_ids)
        for req_id in [r for r in self.settled if r not in requests]:
            del self.settled[req_id]
        num_rows = len(req_ids)
        self.settled_from[:num_rows] = NOT_SETTLED
        self.decode_global_image_feature[:num_rows].zero_()
        settled_rows, features = [], []
        for row, req_id in enumerate(req_ids):
            entry = self.settled.get(req_id)
            if entry is not None:
                self.settled_from[row] = entry.from_position
                settled_rows.append(row)
                features.append(entry.global_image_feature)
            elif not image_spans(requests[req_id].mm_features):
                self.settled_from[row] = 0  # text only: every row fuses zero
        if settled_rows:
            self.decode_global_image_feature[settled_rows] = torch.stack(features)

    def settle(self, row: int, req_id: str, from_position: int, global_image_feature: torch.Tensor) -> None:
        self.settled[req_id] = SettledRequest(from_position, global_image_feature.clone())
        self.settled_from[row] = from_position

    def take_new_image_state_misses(self) -> int:
        new = self.image_state_misses - self.reported_image_state_misses
        self.reported_image_state_misses = self.image_state_misses
        return new

    def summary(self) -> str:
        images = len(self.images)
        tensor_bytes = sum(t.nbytes for image in self.images.values()
                           for t in (image.compressed_tokens, image.global_image_feature))
        tensor_bytes += sum(entry.global_image_feature.nbytes for entry in self.settled.values())
        return (f"ViSpec proposer state: {len(self.settled)} requests with image state, {images} cached images "
                f"(capacity {self.capacity}), {2 * images + len(self.settled)} cached tensors "
                f"({tensor_bytes / 2**20:.1f} MiB), {self.image_state_misses} image-state misses")


class ViSpecProposer(EagleProposer):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        self.runner = runner
        spec = vllm_config.speculative_config
        if vllm_config.model_config.uses_mrope and spec.disable_padded_drafter_batch:
            raise ValueError("ViSpec drafts for M-RoPE targets (Qwen2.5-VL) need vLLM's padded drafter batch; "
                             "remove disable_padded_drafter_batch from the speculative config")
        self.state = ViSpecProposerState(image_state_capacity(vllm_config.scheduler_config.max_num_seqs),
                                         self.max_batch_size, self.hidden_size, self.dtype, device)
        self._missing_image_warned = False
        self._step_attn_metadata = None
        self._chain_rows_filled = False
        self._state_logged_at = time.monotonic()
        if runner is not None:  # the runner hands the miss count on with each step's output
            image_state_metrics.apply_to_model_runner(type(runner))
        if not current_platform.is_cpu():
            logger.info("vispec-vllm: the ViSpec draft runs eagerly (its forward is capture-safe, but CUDA-graph "
                        "capture of it is not yet verified)")

    @property
    def draft(self) -> ViSpecDraftModel:
        model = self.model
        return model.unwrap() if hasattr(model, "unwrap") else model  # under a CUDA-graph wrapper

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
        self._chain_rows_filled = False
        try:
            return super().propose(
                num_speculative_tokens, target_token_ids, target_positions, target_hidden_states, next_token_ids,
                token_indices_to_sample, common_attn_metadata, sampling_metadata, mm_embed_inputs=mm_embed_inputs,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu, slot_mappings=slot_mappings)
        finally:
            self._step_attn_metadata = None

    def build_model_inputs_first_pass(self, num_tokens, num_input_tokens, mm_embed_inputs):
        self._fill_first_pass_rows(num_input_tokens)
        return super().build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)

    def _update_positions_dependent_metadata(self, positions, common_attn_metadata, batch_size,
                                             input_batch_size, block_size):
        if not self._chain_rows_filled:  # the same for every chain step of this propose()
            self._fill_chain_rows(input_batch_size)
            self._chain_rows_filled = True
        return super()._update_positions_dependent_metadata(positions, common_attn_metadata, batch_size,
                                                            input_batch_size, block_size)

    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False,
                  slot_mappings=None) -> None:
        self.draft.clear_row_inputs()  # profile, capture and idle runs see no image anywhere
        return super().dummy_run(num_tokens, use_cudagraphs=use_cudagraphs, is_graph_capturing=is_graph_capturing,
                                 slot_mappings=slot_mappings)

    def take_new_image_state_misses(self) -> int:
        """Misses since the last call (patches/image_state_metrics.py carries them to /metrics)."""
        return self.state.take_new_image_state_misses()

    # -- filling the draft's row buffers ----------------------------------------------------------
    def _fill_chain_rows(self, input_batch_size: int) -> None:
        """One row per request (in input-batch order), each fusing its decode g; the rest padding."""
        draft, num_reqs = self.draft, self.runner.input_batch.num_reqs
        draft.global_image_feature[:num_reqs] = self.state.decode_global_image_feature[:num_reqs]
        draft.global_image_feature[num_reqs:input_batch_size].zero_()
        draft.is_compressed_row[:input_batch_size].zero_()
        draft.is_dropped_row[:input_batch_size].zero_()

    def _fill_first_pass_rows(self, num_input_tokens: int) -> None:
        cad, batch, state, draft = self._step_attn_metadata, self.runner.input_batch, self.state, self.draft
        num_reqs = batch.num_reqs
        state.sync_batch(batch.req_ids, self.runner.requests)
        self._log_state_now_and_then()
        num_rows = int(cad.query_start_loc_cpu[num_reqs])
        query_start = cad.query_start_loc[: num_reqs + 1]
        rows_per_request = (query_start[1:] - query_start[:-1]).long()
        row_request = torch.repeat_interleave(self.arange[:num_reqs].long(), rows_per_request, output_size=num_rows)
        window_start = batch.num_computed_tokens_cpu[:num_reqs]
        planned = np.flatnonzero(window_start < state.settled_from[:num_reqs])
        if planned.size == 0:  # every request settled (always so on a decode step)
            draft.global_image_feature[:num_rows] = state.decode_global_image_feature[row_request]
            draft.is_compressed_row[:num_input_tokens].zero_()
            draft.is_dropped_row[:num_input_tokens].zero_()
        else:
            self._fill_planned_rows(planned, num_rows, row_request, window_start)
            draft.is_compressed_row[num_rows:num_input_tokens].zero_()
            draft.is_dropped_row[num_rows:num_input_tokens].zero_()
        draft.global_image_feature[num_rows:num_input_tokens].zero_()

    def _fill_planned_rows(self, planned: np.ndarray, num_rows: int, row_request: torch.Tensor,
                           window_start: np.ndarray) -> None:
        """Rows of unsettled requests from the row plan; settled requests' rows fuse their decode g."""
        cad, state, draft, device = self._step_attn_metadata, self.state, self.draft, self.device
        req_ids, requests = self.runner.input_batch.req_ids, self.runner.requests
        num_reqs = len(window_start)
        span_request, span_offset, span_length, span_hashes, last_end_row = [], [], [], [], {}
        for i in planned.tolist():
            spans = image_spans(requests[req_ids[i]].mm_features)
            for span in spans:
                span_request.append(i)
                span_offset.append(span.offset)
                span_length.append(span.length)
                span_hashes.append(span.mm_hash)
            last_end_row[i] = spans[-1].end_row if spans else 0
        spans = ImageSpans(torch.tensor(span_request, dtype=torch.long), torch.tensor(span_offset, dtype=torch.long),
                           torch.tensor(span_length, dtype=torch.long))
        query_start = cad.query_start_loc_cpu[: num_reqs + 1]
        rows_per_request = (query_start[1:] - query_start[:-1]).long()
        plan = plan_rows(spans, draft.num_q, query_start, torch.from_numpy(window_start))

        # Only images the plan refers to are looked up (a chunk inside an image needs none).
        num_images, num_compressed = len(span_hashes), draft.num_q - 1
        following = plan.following_global_feature_source[torch.from_numpy(planned)]
        compressed = plan.compressed_index
        used = set(plan.global_feature_source.unique().tolist()) | set(following.tolist())
        if num_compressed:
            used |= set((compressed[compressed >= 0] // num_compressed).unique().tolist())
        found = self._compressed_images({k: span_hashes[k] for k in used if k >= 0})
        zero = torch.zeros(self.hidden_size, dtype=self.dtype, device=device)
        no_tokens = torch.zeros(num_compressed, self.hidden_size, dtype=self.dtype, device=device)
        # Tables indexed by the plan; the last entry (index -1) is zero.
        g_table = torch.stack([found[k].global_image_feature if k in found else zero for k in range(num_images)]
                              + [zero])
        token_table = torch.cat([found[k].compressed_tokens if k in found else no_tokens for k in range(num_images)]
                                + [zero[None]])

        is_planned_row = torch.zeros(num_reqs, dtype=torch.bool)
        is_planned_row[torch.from_numpy(planned)] = True
        is_planned_row = is_planned_row.repeat_interleave(rows_per_request, output_size=num_rows).to(device)
        draft.global_image_feature[:num_rows] = torch.where(
            is_planned_row[:, None], g_table[plan.global_feature_source.to(device)],
            state.decode_global_image_feature[row_request])
        is_compressed = compressed >= 0
        draft.is_compressed_row[:num_rows] = is_compressed.to(device)
        draft.is_dropped_row[:num_rows] = plan.is_dropped.to(device)
        compressed_rows = is_compressed.nonzero().squeeze(1)
        if compressed_rows.numel():
            draft.compressed_token[compressed_rows.to(device)] = token_table[compressed[compressed_rows].to(device)]

        # The chain rows of this step fuse the row after each window; past the last image that
        # is the request's decode g for good.
        decode_g = g_table[following.to(device)]
        state.decode_global_image_feature[torch.from_numpy(planned).to(device)] = decode_g
        window_end = window_start[planned] + rows_per_request.numpy()[planned]
        for j, i in enumerate(planned.tolist()):
            if window_end[j] >= last_end_row[i]:
                state.settle(i, req_ids[i], last_end_row[i], decode_g[j])

    def _compressed_images(self, hashes: dict[int, str]) -> dict[int, CompressedImage]:
        """Image index -> compressed state, for the images found; each missing image counts once."""
        found: dict[int, CompressedImage] = {}
        by_hash: dict[str, CompressedImage | None] = {}
        for index, mm_hash in hashes.items():
            if mm_hash not in by_hash:
                by_hash[mm_hash] = self._compressed_image(mm_hash)
            if by_hash[mm_hash] is not None:
                found[index] = by_hash[mm_hash]
        return found

    def _compressed_image(self, mm_hash: str) -> CompressedImage | None:
        image = self.state.lookup(mm_hash)
        if image is None:
            image_embeds = self.runner.encoder_cache.get(mm_hash)
            if image_embeds is None:
                self._image_state_missing(mm_hash)
                return None
            with torch.inference_mode():
                compressed, global_feature = self.draft.compress_image(image_embeds)
            image = CompressedImage(compressed, global_feature)
            self.state.remember(mm_hash, image)
        return image

    def _image_state_missing(self, mm_hash: str) -> None:
        # Only after the image's features left both caches (evicted, and a prefix-cache hit
        # skipped the encoder): drafts lose the image, outputs stay the target's.
        self.state.image_state_misses += 1
        if not self._missing_image_warned:
            logger.warning("ViSpec: no features for image %s (evicted from the proposer's state, capacity %d, and "
                           "from the encoder cache); drafting without it. Further misses are counted in "
                           "vispec:image_state_misses_total and the state log line", mm_hash, self.state.capacity)
            self._missing_image_warned = True

    def _log_state_now_and_then(self) -> None:
        if time.monotonic() - self._state_logged_at >= STATE_LOG_INTERVAL_S:
            logger.info("%s", self.state.summary())
            self._state_logged_at = time.monotonic()

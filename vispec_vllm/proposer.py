"""ViSpecProposer: vLLM's EAGLE proposer (V1 model runner) feeding a ViSpec draft.

Before each draft forward it fills the draft's row buffers (vispec_vllm/draft_model.py) in place:
for the first pass over the step's rows from the row plan (vispec_vllm/row_plan.py: which rows
are dropped image rows, which hold the adaptor's compressed tokens, which image's global feature
g each row fuses, as its global image term), and for each step of the chain of one row per request from each request's
decode g. vLLM's own EAGLE drafting then runs unchanged. Draft positions are the raw 1-D token
index for every target (for M-RoPE targets this also avoids vLLM issue #54498).

A request is "settled" once its rows lie past its last image's rows: from then on every row it
drafts fuses the same g (its prompt's last image). Settled requests, which are all requests on a
decode step, cost no per-request Python work: their g sits in a device tensor indexed by vLLM's
input-batch row. Only requests whose window still touches an image (prefill chunks) are planned,
reading their image spans.

Each hook works from its own arguments and the proposer state alone; what survives a step lives
in `self.state` (vispec_vllm/proposer_state.py), and what one propose() works out at a forward for
its later forwards (the chain's rows, the block table its attention reads) in `self.step`, new at
every call.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from vispec_vllm.draft_model import EAGER_DRAFT_ENV, ViSpecDraftModel, eager_draft_forced
from vispec_vllm.proposer_state import (
    KeyBlocksRead,
    ProposeCall,
    ViSpecProposerState,
    image_state_capacity,
    image_tables,
    request_image_spans,
)
from vispec_vllm.row_plan import ImageSpan, dropped_key_blocks, plan_rows

logger = logging.getLogger("vllm.vispec_vllm")


class ViSpecProposer(EagleProposer):
    """vLLM's EAGLE proposer, filling the ViSpec draft's row buffers before each draft forward."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        self.runner = runner
        if vllm_config.model_config.uses_mrope and vllm_config.speculative_config.disable_padded_drafter_batch:
            raise ValueError("ViSpec drafts for M-RoPE targets (Qwen2.5-VL) need vLLM's padded drafter batch; "
                             "remove disable_padded_drafter_batch from the speculative config")
        self.state = ViSpecProposerState(image_state_capacity(vllm_config.scheduler_config.max_num_seqs),
                                         self.max_batch_size, self.hidden_size, self.dtype, device)
        # What one propose() works out at a forward and its later forwards reuse (a new one
        # every call: nothing in it outlives the step).
        self.step = ProposeCall()
        if eager_draft_forced():
            logger.info("vispec-vllm: the ViSpec draft runs eagerly (%s=1)", EAGER_DRAFT_ENV)

    @property
    def draft(self) -> ViSpecDraftModel:
        model = self.model
        return model.unwrap() if hasattr(model, "unwrap") else model  # under a CUDA-graph wrapper

    def take_new_image_state_misses(self) -> int:
        """Misses since the last call (patches/image_state_metrics.py carries them to /metrics)."""
        return self.state.take_new_image_state_misses()

    # -- positions: the draft always uses the raw 1-D token index ------------------------------
    def _set_positions(self, num_tokens: int, positions: torch.Tensor) -> None:
        if positions.dim() == 2:  # M-RoPE target: the runner keeps the 1-D index beside it
            positions = self.runner.positions[:num_tokens]
        self.positions[:num_tokens] = positions

    # -- the draft's row buffers, before each forward of vLLM's propose() ----------------------
    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None) -> torch.Tensor:
        # Timed on decode steps only (no request past K + 1 query rows): a prefill's first pass runs
        # over the whole prompt and is not what one drafted token costs.
        timing = self.state.draft_timing
        if timing is not None and common_attn_metadata.max_query_len > num_speculative_tokens + 1:
            timing = None
        if timing is not None:
            started = self._synchronized_clock()
        # The first pass's rows are this step's query rows (vLLM's default EAGLE path keeps them).
        self.step = ProposeCall()
        self._fill_first_pass_rows(common_attn_metadata)
        drafts = super().propose(
            num_speculative_tokens, target_token_ids, target_positions, target_hidden_states, next_token_ids,
            token_indices_to_sample, common_attn_metadata, sampling_metadata, mm_embed_inputs=mm_embed_inputs,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu, slot_mappings=slot_mappings)
        if timing is not None:
            timing.add(self._synchronized_clock() - started, num_speculative_tokens)
        return drafts

    def _synchronized_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def build_model_inputs_first_pass(self, num_tokens, num_input_tokens, mm_embed_inputs):
        self.draft.clear_row_inputs(num_tokens, num_input_tokens)  # the first pass's padding rows
        return super().build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)

    def _update_positions_dependent_metadata(self, positions, common_attn_metadata, batch_size,
                                             input_batch_size, block_size):
        # Before the chain steps: one row per request (input-batch order) fusing its decode g, then
        # padding. The same at every chain step of a propose() (nothing else writes the buffers
        # between them), so written before the first only: at K=5, three copies a step saved.
        if not self.step.chain_rows_written:
            self.draft.set_text_rows(self.state.decode_global_image_term[:batch_size])
            self.draft.clear_row_inputs(batch_size, input_batch_size)
            self.step.chain_rows_written = True
        return super()._update_positions_dependent_metadata(positions, common_attn_metadata, batch_size,
                                                            input_batch_size, block_size)

    def build_per_group_and_layer_attn_metadata(self, common_attn_metadata: CommonAttentionMetadata,
                                                draft_index: int = 0):
        # Every forward's attention reads through this: rows of settled requests skip the KV
        # blocks that hold only dropped image rows (zero weight for every query past them), so
        # the draft reads no more keys than the image's compressed rows and the text need. Cache
        # writes keep the full table (vLLM passes their slots separately). vLLM builds a step's
        # first forward with draft_index 0 and its chain forwards over the same block table, so
        # the table read is gathered once a step; only the sequence lengths move along the chain.
        cad = common_attn_metadata
        if draft_index == 0:
            self.step.key_blocks = self._key_blocks_of_step(cad.block_table_tensor)
        if self.step.key_blocks is not None:
            read, block_table = self.step.key_blocks
            upper_bound = cad.seq_lens_cpu_upper_bound
            cad = cad.replace(block_table_tensor=block_table, seq_lens=cad.seq_lens - read.skipped_rows,
                              seq_lens_cpu_upper_bound=None if upper_bound is None
                              else upper_bound - read.skipped_rows_cpu,
                              _num_computed_tokens_cache=None)
        return super().build_per_group_and_layer_attn_metadata(cad, draft_index)

    def _key_blocks_of_step(self, table: torch.Tensor) -> tuple[KeyBlocksRead, torch.Tensor] | None:
        """The step's key-block view (None: every row reads every block) and the block table it reads."""
        read = self.state.key_blocks_read(self.runner.input_batch.num_computed_tokens_cpu, table.shape[0],
                                          table.shape[1], self.block_size)
        # built for exactly table.shape[0] rows, on the proposer's device
        return None if read is None else (read, table.gather(1, read.index))

    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False,
                  slot_mappings=None) -> None:
        self.draft.clear_row_inputs()  # profile, capture and idle runs see no image anywhere
        return super().dummy_run(num_tokens, use_cudagraphs=use_cudagraphs, is_graph_capturing=is_graph_capturing,
                                 slot_mappings=slot_mappings)

    def _fill_first_pass_rows(self, cad: CommonAttentionMetadata) -> None:
        """Requests whose window still touches an image from the row plan; the rest fuse their decode g."""
        batch, state = self.runner.input_batch, self.state
        num_reqs = batch.num_reqs
        state.sync_batch(batch.req_ids, self.runner.requests)
        state.log_summary_now_and_then()
        window_start = batch.num_computed_tokens_cpu[:num_reqs]
        planned = np.flatnonzero(window_start < state.settled_from[:num_reqs])
        if planned.size:
            self._fill_planned_rows(cad, planned)
            return
        # Every request settled (always so on a decode step): row r fuses its request's decode g,
        # gathered on the device from the query layout already there.
        query_start = cad.query_start_loc[: num_reqs + 1]
        num_rows = int(cad.query_start_loc_cpu[num_reqs])
        rows_per_request = (query_start[1:] - query_start[:-1]).long()
        row_request = torch.repeat_interleave(self.arange[:num_reqs].long(), rows_per_request, output_size=num_rows)
        self.draft.set_text_rows(torch.index_select(state.decode_global_image_term, 0, row_request))

    def _fill_planned_rows(self, cad: CommonAttentionMetadata, planned: np.ndarray) -> None:
        """A step with requests whose window touches an image (`planned`, input-batch rows): their
        rows as the row plan says, every other request's rows fusing its decode g. Settles the
        planned requests whose window reaches past their last image."""
        batch, requests, state, draft = self.runner.input_batch, self.runner.requests, self.state, self.draft
        num_reqs = batch.num_reqs
        query_start = cad.query_start_loc_cpu[: num_reqs + 1].numpy()
        window_start = batch.num_computed_tokens_cpu[:num_reqs]
        spans = {i: request_image_spans(requests[batch.req_ids[i]].mm_features, i) for i in planned.tolist()}
        images = [span for request_spans in spans.values() for span in request_spans]
        # Requests that are not planned bring no image, so the plan gives their rows no image (-1).
        plan = plan_rows(images, draft.num_q, query_start, window_start, keep_image_rows=draft.keep_image_rows)
        g_table, token_table = self._image_tables(images, plan.referenced_images)
        # One table of every g a row may fuse: the requests' decode g, then the images' g and a
        # zero last row. A planned request's row fuses what the plan says (an image's g, or zero);
        # any other row its request's decode g. Table rows and flags are worked out on the host
        # (the plan's -1, no image, is each table's zero last row: -1 % n = n - 1) and reach the
        # device in one copy.
        terms = torch.cat((state.decode_global_image_term[:num_reqs], g_table))
        row_request = np.repeat(np.arange(num_reqs), np.diff(query_start))
        is_planned = np.zeros(num_reqs, dtype=bool)
        is_planned[planned] = True
        image_source = plan.global_feature_source.numpy()
        compressed_index = plan.compressed_index.numpy()
        image_term_row = np.where(image_source >= 0, num_reqs + image_source, len(terms) - 1)
        per_row = torch.from_numpy(np.stack((np.where(is_planned[row_request], image_term_row, row_request),
                                             compressed_index % len(token_table), compressed_index >= 0,
                                             plan.is_dropped.numpy())))
        term_row, token_row, is_compressed, is_dropped = per_row.to(self.device).unbind()
        draft.set_planned_rows(terms, term_row, token_table, token_row, is_compressed, is_dropped)

        # The chain rows of this step fuse the row after each window; past the last image that is
        # the request's decode g for good.
        following_g = torch.index_select(
            g_table, 0, torch.from_numpy(plan.following_global_feature_source.numpy()[planned] % len(g_table))
            .to(self.device))
        state.decode_global_image_term.index_copy_(0, torch.from_numpy(planned).to(self.device), following_g)
        window_end = window_start[planned] + query_start[planned + 1] - query_start[planned]
        for j, i in enumerate(planned.tolist()):
            last_end_row = spans[i][-1].end_row if spans[i] else 0
            if window_end[j] >= last_end_row:
                state.settle(i, batch.req_ids[i], last_end_row, following_g[j],
                             dropped_key_blocks(spans[i], draft.num_q, self.block_size, draft.keep_image_rows))

    def _image_tables(self, images: list[ImageSpan], referenced: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(g per image, compressed tokens of image k at k * (num_q-1) + j), each with a zero last entry
        (index -1: no image). Only the images the plan refers to are looked up (a chunk inside an
        image needs none); an image without state reads as zero."""
        found = self.state.compressed_images({k: images[k].mm_hash for k in referenced}, self.runner.encoder_cache,
                                             self.draft.compress_image)
        return image_tables([found.get(k) for k in range(len(images))], self.draft.num_q - 1, self.hidden_size,
                            self.dtype, self.device)

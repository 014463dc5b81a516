"""vLLM's CPU stand-ins for its Triton kernels, checked against PyTorch references of the kernels.

Without Triton, vLLM's CPU platform replaces each Triton kernel by a Python wrapper around a C++
op (`vllm.utils.cpu_triton_utils`, registered by `CpuPlatform.register_triton_kernel_overrides`).
Each test here registers the plugin (which applies its patches) and then the overrides, as the
worker does, calls the module-level function that vLLM's own call site calls, on inputs with the
dtypes, shapes and strides that call site passes on CPU, and compares with a reference written
from the Triton kernel's source (loops, one request at a time, no vLLM code).
"""

from __future__ import annotations

import pytest
import torch

PAD_ID = -1  # vLLM's PAD_SLOT_ID / PADDING_SLOT_ID / PLACEHOLDER_TOKEN_ID
STALE = 777  # what a reused buffer held before the call


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel_overrides():
    """The plugin's patches, then vLLM's CPU kernel overrides, in the worker's order."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:
        pytest.skip("vLLM registers these CPU stand-ins only on the CPU platform without Triton")
    import vispec_vllm

    vispec_vllm.register()
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()


def starts_and_ends(cu_num: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each request from an inclusive cumulative count, as the kernels read it."""
    ends = cu_num.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


# -- rejection_sampler.expand_kernel (expand_batch_to_tokens) --------------------------------------


def expand_reference(values: list, cu_num_tokens: list[int], replace_from=0, replace_to=0) -> list:
    out = []
    for value, (start, end) in zip(values, starts_and_ends(torch.tensor(cu_num_tokens)), strict=True):
        out += [replace_to if value == replace_from else value] * (end - start)
    return out


# float32 (temperature, top-p) and int32 (top-k) fail without patches/cpu_sampling_fallbacks.py:
# vLLM's stand-in fills an int64 copy of the output and drops it. int64 is the control: vLLM's own
# op is right for it, and the patch must stay right for it too.
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_batch_to_tokens_fills_the_callers_output(dtype):
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    values = [1, 7] if dtype != torch.float32 else [1.0, 0.7]
    expanded = expand_batch_to_tokens(torch.tensor(values, dtype=dtype), torch.tensor([3, 6]), 6)
    assert expanded.dtype == dtype
    assert expanded.tolist() == pytest.approx(expand_reference(values, [3, 6]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_batch_to_tokens_replaces_and_skips_requests_without_drafts(dtype):
    # As `apply_sampling_constraints` expands temperature: greedy (0) becomes 1; the middle request
    # has no draft tokens this step (a prefill in the batch), so it owns no output position.
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    values = [0, 2, 5] if dtype != torch.float32 else [0.0, 0.5, 0.8]
    cu_num_tokens = [2, 2, 5]
    expanded = expand_batch_to_tokens(torch.tensor(values, dtype=dtype), torch.tensor(cu_num_tokens, dtype=torch.int32),
                                      5, replace_from=0, replace_to=1)
    assert expanded.tolist() == pytest.approx(expand_reference(values, cu_num_tokens, replace_from=0, replace_to=1))


def test_the_rejection_sampler_checks_that_the_replacement_was_registered():
    # patches/cpu_sampling_fallbacks.py replaces vLLM's expand stand-in, which vLLM reads once, when
    # the worker registers its overrides. Were they registered before the plugin replaced it (a
    # change in vLLM's start-up order), building the rejection sampler, as the model runner does at
    # start-up, must stop with an error that names the patch rather than sample from garbage.
    from vispec_vllm.patches._wrap import PatchError, original_of
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    RejectionSampler(Sampler())  # the worker's order (plugin, then overrides): accepted
    try:
        with pytest.MonkeyPatch.context() as before_the_plugin:
            before_the_plugin.setattr(cpu_triton_utils, "_expand_kernel_impl",
                                      original_of(cpu_triton_utils, "_expand_kernel_impl"))
            current_platform.register_triton_kernel_overrides()
        with pytest.raises(PatchError, match=r"^vispec-vllm patch cpu_sampling_fallbacks .*launches "
                                             r"vllm\.utils\.cpu_triton_utils\._expand_kernel_impl"):
            RejectionSampler(Sampler())
    finally:
        current_platform.register_triton_kernel_overrides()  # the patched stand-in again, for the other tests
    RejectionSampler(Sampler())


def sampling_metadata(temperature: list[float], top_k: list[int]):
    """A random-sampling batch with per-request temperature and top-k, nothing else (as InputBatch makes it)."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    num_reqs = len(temperature)
    return SamplingMetadata(
        temperature=torch.tensor(temperature), all_greedy=False, all_random=True, top_p=None,
        top_k=torch.tensor(top_k, dtype=torch.int32), generators={}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.zeros(num_reqs), presence_penalties=torch.zeros(num_reqs),
        repetition_penalties=torch.ones(num_reqs), output_token_ids=[[] for _ in range(num_reqs)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def test_top_k_on_a_verify_step_without_draft_tokens():
    # A verify step whose requests carry no draft tokens: the rejection sampler samples each
    # request's bonus token and hands apply_sampling_constraints target logits of shape
    # [0, vocab]; vLLM's CPU top-k (apply_top_k_only) took `k.max()` of the empty top-k and raised
    # (patches/cpu_sampling_fallbacks.py). Through vLLM's own RejectionSampler.forward.
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    top_k = [3, 5]
    logits = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    rejection_sampler = RejectionSampler(Sampler())
    no_drafts = SpecDecodeMetadata.make_dummy([[], []], torch.device("cpu"))
    no_drafts.bonus_logits_indices = torch.tensor([0, 1], dtype=torch.int32)
    sampled = set()
    for _ in range(20):
        output = rejection_sampler(no_drafts, None, logits.clone(), sampling_metadata([1.0, 0.5], top_k))
        assert output.sampled_token_ids.shape == (2, 1)  # one bonus token per request, nothing verified
        sampled |= {(request, int(token)) for request, token in enumerate(output.sampled_token_ids[:, 0])}
    allowed = {(request, int(token)) for request in range(2) for token in logits[request].topk(top_k[request]).indices}
    assert sampled <= allowed and len(sampled) > 2  # top-k applied, and sampling, not argmax


# -- block_table.ComputeSlotMappingKernel (BlockTable.compute_slot_mapping) ------------------------


def slot_mapping_reference(query_start_loc: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor,
                           block_size: int) -> list[int]:
    """Slot of each scheduled token: its request's block for the position, plus the offset in it."""
    slots = []
    for request, (start, end) in enumerate(starts_and_ends(query_start_loc[1:])):
        for position in positions[start:end].tolist():
            slots.append(int(block_table[request, position // block_size]) * block_size + position % block_size)
    return slots


def test_compute_slot_mapping_through_the_block_table():
    # As GPUModelRunner._prepare_inputs calls it: the block table's whole (max_num_reqs, width)
    # int32 buffer, int64 positions[:num_tokens], int32 query_start_loc[:num_reqs + 1], a reused
    # int64 slot_mapping buffer of max_num_batched_tokens.
    #
    # Not compared: slot_mapping[num_tokens:]. The Triton kernel also writes PAD_ID there; vLLM's CPU
    # stand-in drops num_tokens, max_num_tokens and PAD_ID and leaves it as it was. Nothing in vLLM
    # reads it: GPUModelRunner._get_slot_mappings hands out slot_mapping[:num_tokens_padded] after
    # filling [num_tokens:num_tokens_padded] with -1 itself, and the EAGLE proposer copies
    # slot_mapping[:num_tokens] into its own buffer and pads that itself (_get_slot_mapping).
    # block_table_stride is dropped too; the C++ op reads block_table.stride(0), the same number.
    from vllm.v1.worker.block_table import BlockTable

    block_size, max_num_reqs, width, max_num_tokens = 32, 4, 8, 64
    table = BlockTable(block_size=block_size, max_num_reqs=max_num_reqs, max_num_blocks_per_req=width,
                       max_num_batched_tokens=max_num_tokens, pin_memory=False, device=torch.device("cpu"),
                       cp_kv_cache_interleave_size=1)
    table.add_row([5, 9, 2], 0)
    table.add_row([7], 1)
    table.add_row([3, 4, 11, 12], 2)
    table.commit_block_table(3)
    table.slot_mapping.gpu.fill_(STALE)
    # Request 0: a decode step with 3 drafts crossing a block boundary; 1: a short prefill;
    # 2: a chunk deep into its prompt.
    positions = torch.tensor([30, 31, 32, 33, 0, 1, 2, 100, 101, 127, 96], dtype=torch.int64)
    query_start_loc = torch.tensor([0, 4, 7, 11], dtype=torch.int32)
    table.compute_slot_mapping(3, query_start_loc, positions)

    expected = slot_mapping_reference(query_start_loc, positions, table.block_table.gpu, block_size)
    assert table.slot_mapping.gpu[: len(positions)].tolist() == expected


# -- spec_decode.utils.eagle_step_slot_mapping_metadata_kernel -------------------------------------


def eagle_step_reference(positions, block_table, seq_lens, block_size, max_model_len, input_batch_size):
    """(clamped positions, slot mapping[:input_batch_size], seq_lens) after one EAGLE draft step."""
    clamped, slots, new_seq_lens = [], [], []
    n_blocks_per_req = block_table.shape[1]
    for request, position in enumerate(positions.tolist()):
        exceeds = position + 1 >= max_model_len
        new_position = 0 if exceeds else position + 1
        block_number = min(new_position // block_size, n_blocks_per_req - 1)
        slot = int(block_table[request, block_number]) * block_size + new_position % block_size
        clamped.append(new_position)
        slots.append(PAD_ID if exceeds else slot)
        new_seq_lens.append(min(1 if exceeds else int(seq_lens[request]) + 1, max_model_len))
    slots += [PAD_ID] * (input_batch_size - len(positions))  # cudagraph padding rows
    return clamped, slots, new_seq_lens


@pytest.mark.parametrize("aliased", [False, True], ids=["first-step", "later-step"])
@pytest.mark.parametrize("input_batch_size", [3, 5], ids=["unpadded", "padded"])
def test_eagle_step_update_slot_mapping_and_metadata(aliased, input_batch_size):
    # As EagleProposer._update_positions_dependent_metadata calls it: int64 positions (gathered at
    # token_indices_to_sample on the first step, then the proposer's own positions[:batch_size],
    # which is also the output), block_table_tensor = the (max_num_reqs, width) int32 buffer's first
    # rows, int32 seq_lens[:num_reqs] updated in place, slot mapping = the proposer's int64 buffer
    # [:input_batch_size]. One request steps past max_model_len.
    from vllm.v1.spec_decode.utils import eagle_step_update_slot_mapping_and_metadata

    block_size, max_model_len, batch_size = 32, 96, 3
    block_table_buffer = torch.arange(40, dtype=torch.int32).view(8, 5)  # width 5 > blocks in use
    block_table = block_table_buffer[:batch_size]
    seq_lens_buffer = torch.tensor([40, 64, 95, 9, 9], dtype=torch.int32)
    seq_lens = seq_lens_buffer[:batch_size]
    positions_buffer = torch.full((16,), STALE, dtype=torch.int64)
    slot_mapping_buffer = torch.full((16,), STALE, dtype=torch.int64)
    start = torch.tensor([38, 63, 95], dtype=torch.int64)
    if aliased:
        positions_buffer[:batch_size] = start
        positions = positions_buffer[:batch_size]
    else:
        positions = start.clone()
    expected = eagle_step_reference(start, block_table, seq_lens.clone(), block_size, max_model_len, input_batch_size)

    eagle_step_update_slot_mapping_and_metadata(
        positions_1d=positions, block_table_tensor=block_table, seq_lens=seq_lens, block_size=block_size,
        max_model_len=max_model_len, out_clamped_positions=positions_buffer[:batch_size],
        out_slot_mapping=slot_mapping_buffer[:input_batch_size], input_batch_size=input_batch_size)

    clamped, slots, new_seq_lens = expected
    assert positions_buffer[:batch_size].tolist() == clamped
    assert slot_mapping_buffer[:input_batch_size].tolist() == slots
    assert seq_lens.tolist() == new_seq_lens
    # Nothing written past what the kernel owns.
    assert slot_mapping_buffer[input_batch_size:].eq(STALE).all()
    assert seq_lens_buffer[batch_size:].tolist() == [9, 9]


# -- spec_decode.utils.eagle_prepare_inputs_padded_kernel -----------------------------------------


def prepare_inputs_padded_reference(cu_num_draft_tokens, valid_sampled_tokens_count, query_start_loc):
    """(token index to sample, number of rejected tokens) of each request."""
    indices, rejected = [], []
    for request, (start, end) in enumerate(starts_and_ends(cu_num_draft_tokens)):
        num_draft_tokens = end - start
        num_rejected = num_draft_tokens + 1 - int(valid_sampled_tokens_count[request]) if num_draft_tokens > 0 else 0
        indices.append(int(query_start_loc[request + 1]) - 1 - num_rejected)
        rejected.append(num_rejected)
    return indices, rejected


def test_eagle_prepare_inputs_padded():
    # As EagleProposer.prepare_inputs_padded calls it: int32 cu_num_draft_tokens (numpy cumsum,
    # dtype int32), int32 valid counts (prepare_next_token_ids_padded's output), int32
    # query_start_loc, int32 outputs allocated with torch.empty. Request 1 is a prefill (no drafts).
    from vllm.v1.spec_decode.utils import _eagle_prepare_inputs_padded

    cu_num_draft_tokens = torch.tensor([3, 3, 6, 9], dtype=torch.int32)
    valid_sampled_tokens_count = torch.tensor([2, 1, 4, 1], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 4, 11, 15, 19], dtype=torch.int32)
    token_indices_to_sample = torch.full((4,), STALE, dtype=torch.int32)
    num_rejected_tokens = torch.full((4,), STALE, dtype=torch.int32)
    _eagle_prepare_inputs_padded(cu_num_draft_tokens, valid_sampled_tokens_count, query_start_loc,
                                 token_indices_to_sample, num_rejected_tokens, 4)

    indices, rejected = prepare_inputs_padded_reference(cu_num_draft_tokens, valid_sampled_tokens_count,
                                                        query_start_loc)
    assert token_indices_to_sample.tolist() == indices
    assert num_rejected_tokens.tolist() == rejected


# -- spec_decode.utils.eagle_prepare_next_token_padded_kernel -------------------------------------


def prepare_next_token_reference(sampled_token_ids, discard_request_mask, backup_next_token_ids, vocab_size):
    """(next token, number of valid sampled tokens) of each request."""
    next_tokens, counts = [], []
    for request, row in enumerate(sampled_token_ids.tolist()):
        valid = [token for token in row if token != -1 and token < vocab_size]
        if bool(discard_request_mask[request]) or not valid:
            next_tokens.append(int(backup_next_token_ids[request]))
        else:
            next_tokens.append(valid[-1])
        counts.append(0 if bool(discard_request_mask[request]) else len(valid))
    return next_tokens, counts


def strided_rows(rows: list[list[int]], width: int) -> torch.Tensor:
    """rows as the first columns of a wider int32 buffer: row stride != number of columns."""
    buffer = torch.full((len(rows), width), 5, dtype=torch.int32)
    view = buffer[:, : len(rows[0])]
    view.copy_(torch.tensor(rows, dtype=torch.int32))
    return view


@pytest.mark.parametrize("layout", ["rejection-sampler", "plain-sampler", "strided-view"])
def test_eagle_prepare_next_token_padded(layout):
    # As EagleProposer.prepare_next_token_ids_padded calls it: sampled_token_ids is the sampler's
    # int32 output, contiguous: (num_reqs, max_spec_len + 1) with -1 for rejected positions from the
    # rejection sampler, (num_reqs, 1) from the plain sampler; int32 backup tokens and outputs, bool
    # discard mask; stride passed as sampled_token_ids.stride(0). The wrapper ignores `stride` (the
    # C++ op reads the tensor's own stride(0)); vLLM never passes a strided view on CPU, the
    # "strided-view" case only shows the wrapper would still be right for one.
    from vllm.v1.spec_decode.utils import _eagle_prepare_next_token_padded, next_power_of_2

    vocab_size = 100
    if layout == "plain-sampler":
        sampled = torch.tensor([[17], [4], [-1], [3]], dtype=torch.int32)
    else:
        # Padded-vocab ids (>= vocab_size) count as invalid, like -1.
        rows = [[17, 23, -1, -1], [4, 5, 6, 7], [-1, -1, -1, -1], [8, 9, 120, -1]]
        sampled = strided_rows(rows, 7) if layout == "strided-view" else torch.tensor(rows, dtype=torch.int32)
    discard_request_mask = torch.tensor([False, False, False, True])
    backup_next_token_ids = torch.tensor([91, 92, 93, 94, 0, 0], dtype=torch.int32)  # max_batch_size buffer
    next_token_ids = torch.full((4,), STALE, dtype=torch.int32)
    valid_sampled_tokens_count = torch.full((4,), STALE, dtype=torch.int32)
    num_reqs, num_tokens = sampled.shape
    _eagle_prepare_next_token_padded(sampled, discard_request_mask, backup_next_token_ids, next_token_ids,
                                     valid_sampled_tokens_count, vocab_size, num_tokens, num_reqs, sampled.stride(0),
                                     BLOCK_SIZE_TOKENS=next_power_of_2(num_tokens))

    expected_next, expected_counts = prepare_next_token_reference(sampled, discard_request_mask, backup_next_token_ids,
                                                                  vocab_size)
    assert next_token_ids.tolist() == expected_next
    assert valid_sampled_tokens_count.tolist() == expected_counts


# -- spec_decode.utils.copy_and_expand_eagle_inputs_kernel ----------------------------------------


def copy_and_expand_eagle_reference(buffers: dict, target_token_ids, target_positions, next_token_ids,
                                    query_start_loc, query_end_loc, padding_token_id, parallel_drafting_token_id,
                                    num_padding_slots_per_request, shift_input_ids) -> dict:
    """The kernel's writes into copies of `buffers` (the draft's inputs, masks and index maps)."""
    out = {name: buffer.clone() for name, buffer in buffers.items()}
    total_input_tokens = len(target_token_ids)
    slots = num_padding_slots_per_request
    for request in range(len(query_end_loc)):
        query_start, next_query_start = int(query_start_loc[request]), int(query_start_loc[request + 1])
        query_end = int(query_end_loc[request])
        if shift_input_ids:
            num_valid, input_offset, out_start = query_end - query_start, 1, query_start + request * (slots - 1)
        else:
            num_valid, input_offset, out_start = query_end - query_start + 1, 0, query_start + request * slots
        num_rejected = next_query_start - query_end - 1
        start_position = int(target_positions[query_start])
        for j in range(num_valid + slots + num_rejected):
            index = out_start + j
            rejected = j >= num_valid + slots
            if j < num_valid:
                token = int(target_token_ids[min(query_start + input_offset + j, total_input_tokens - 1)])
            elif j == num_valid:
                token = int(next_token_ids[request])
            elif not rejected:
                token = parallel_drafting_token_id
            else:
                token = padding_token_id
            out["input_ids"][index] = token
            out["positions"][index] = 0 if rejected else start_position + j
            out["is_rejected"][index] = rejected
            out["is_masked"][index] = num_valid < j < num_valid + slots
            if num_valid <= j < num_valid + slots:
                out["new_token_indices"][request * slots + j - num_valid] = index
        if shift_input_ids:
            for j in range(next_query_start - query_start):
                out["hidden_state_mapping"][query_start + j] = out_start + j
    return out


@pytest.mark.parametrize(("shift_input_ids", "num_padding_slots_per_request"),
                         [(True, 3), (False, 1), (False, 3)],
                         ids=["eagle-parallel-drafting", "draft-model", "draft-model-parallel-drafting"])
def test_copy_and_expand_eagle_inputs(shift_input_ids, num_padding_slots_per_request):
    # As EagleProposer.set_inputs_first_pass calls it (draft models, parallel drafting): int32
    # target ids (input_ids[:num_tokens]), int64 positions, int32 next tokens; outputs are the
    # proposer's int32 input_ids and int64 positions buffers (max_num_tokens), bool masks, int32
    # index maps; query_end_loc = query_start_loc[1:] - 1 - num_rejected (padded batch).
    from vllm.v1.spec_decode.utils import _copy_and_expand_eagle_inputs, next_power_of_2

    max_num_tokens, batch_size = 40, 3
    query_start_loc = torch.tensor([0, 4, 10, 14], dtype=torch.int32)  # a decode with drafts, a prefill, a decode
    num_rejected = torch.tensor([2, 0, 0], dtype=torch.int32)
    query_end_loc = query_start_loc[1:] - 1 - num_rejected
    total_input_tokens = int(query_start_loc[-1])
    target_token_ids = torch.arange(100, 100 + total_input_tokens, dtype=torch.int32)
    target_positions = torch.tensor([50, 51, 52, 53, 0, 1, 2, 3, 4, 5, 20, 21, 22, 23], dtype=torch.int64)
    next_token_ids = torch.tensor([61, 62, 63], dtype=torch.int32)
    net_new_slots = num_padding_slots_per_request - (1 if shift_input_ids else 0)
    buffers = {
        "input_ids": torch.full((max_num_tokens,), STALE, dtype=torch.int32),
        "positions": torch.full((max_num_tokens,), STALE, dtype=torch.int64),
        "is_rejected": torch.ones(max_num_tokens, dtype=torch.bool),
        "is_masked": torch.ones(max_num_tokens, dtype=torch.bool),
        "new_token_indices": torch.full((batch_size * num_padding_slots_per_request,), STALE, dtype=torch.int32),
        "hidden_state_mapping": torch.full((total_input_tokens,), STALE, dtype=torch.int32),
    }
    expected = copy_and_expand_eagle_reference(buffers, target_token_ids, target_positions, next_token_ids,
                                               query_start_loc, query_end_loc, 0, 9, num_padding_slots_per_request,
                                               shift_input_ids)
    max_num_tokens_per_request = 6 + net_new_slots  # max query length + net new slots
    block_size_tokens = min(256, next_power_of_2(max_num_tokens_per_request))
    _copy_and_expand_eagle_inputs(
        target_token_ids_ptr=target_token_ids, target_positions_ptr=target_positions,
        next_token_ids_ptr=next_token_ids, out_input_ids_ptr=buffers["input_ids"],
        out_positions_ptr=buffers["positions"], out_is_rejected_token_mask_ptr=buffers["is_rejected"],
        out_is_masked_token_mask_ptr=buffers["is_masked"], out_new_token_indices_ptr=buffers["new_token_indices"],
        out_hidden_state_mapping_ptr=buffers["hidden_state_mapping"], query_start_loc_ptr=query_start_loc,
        query_end_loc_ptr=query_end_loc, padding_token_id=0, parallel_drafting_token_id=9,
        total_input_tokens=total_input_tokens, num_padding_slots_per_request=num_padding_slots_per_request,
        shift_input_ids=shift_input_ids, BLOCK_SIZE_TOKENS=block_size_tokens, batch_size=batch_size,
        num_blocks=-(-max_num_tokens_per_request // block_size_tokens))

    for name, buffer in buffers.items():
        assert buffer.tolist() == expected[name].tolist(), name


# -- spec_decode.utils.copy_and_expand_dflash_inputs_kernel ---------------------------------------


def copy_and_expand_dflash_reference(buffers: dict, next_token_ids, target_positions, block_table, block_size,
                                     query_start_loc, num_rejected, parallel_drafting_token_id,
                                     num_speculative_tokens) -> dict:
    out = {name: buffer.clone() for name, buffer in buffers.items()}
    total_input_tokens = len(target_positions)
    num_query_per_req = 1 + num_speculative_tokens
    width = block_table.shape[1]

    def slot(request: int, position: int) -> int:
        return int(block_table[request, min(position // block_size, width - 1)]) * block_size + position % block_size

    for request in range(len(query_start_loc) - 1):
        context_start, context_end = int(query_start_loc[request]), int(query_start_loc[request + 1])
        valid_context_end = context_end - (int(num_rejected[request]) if num_rejected is not None else 0)
        last_position = int(target_positions[valid_context_end - 1])
        for j in range(context_end - context_start):
            position = int(target_positions[min(context_start + j, total_input_tokens - 1)])
            out["context_positions"][context_start + j] = position
            out["context_slot_mapping"][context_start + j] = slot(request, position)
        for query_offset in range(num_query_per_req):
            index = request * num_query_per_req + query_offset
            position = last_position + 1 + query_offset
            out["query_positions"][index] = position
            out["query_slot_mapping"][index] = slot(request, position)
            out["input_ids"][index] = int(next_token_ids[request]) if query_offset == 0 else parallel_drafting_token_id
            if query_offset > 0:
                out["token_indices"][request * num_speculative_tokens + query_offset - 1] = index
    return out


@pytest.mark.parametrize("padded", [True, False], ids=["with-rejected", "no-rejected"])
def test_copy_and_expand_dflash_inputs(padded):
    # As DFlashProposer.set_inputs_first_pass calls it: int32 next tokens, int64 target positions,
    # its int32 input_ids / int64 position and slot buffers, int32 block-table rows, int32
    # query_start_loc, int32 num_rejected or 0.
    from vllm.v1.spec_decode.utils import _copy_and_expand_dflash_inputs, next_power_of_2

    block_size, num_speculative_tokens = 4, 2
    num_query_per_req = 1 + num_speculative_tokens
    block_table = torch.arange(10, 34, dtype=torch.int32).view(4, 6)[:2]
    query_start_loc = torch.tensor([0, 3, 8], dtype=torch.int32)
    num_rejected = torch.tensor([1, 0], dtype=torch.int32) if padded else None
    target_positions = torch.tensor([6, 7, 8, 0, 1, 2, 3, 4], dtype=torch.int64)
    next_token_ids = torch.tensor([41, 42], dtype=torch.int32)
    buffers = {
        "input_ids": torch.full((12,), STALE, dtype=torch.int32),
        "context_positions": torch.full((16,), STALE, dtype=torch.int64),
        "query_positions": torch.full((12,), STALE, dtype=torch.int64),
        "context_slot_mapping": torch.full((16,), STALE, dtype=torch.int64),
        "query_slot_mapping": torch.full((12,), STALE, dtype=torch.int64),
        "token_indices": torch.full((2 * num_speculative_tokens,), STALE, dtype=torch.int32),
    }
    expected = copy_and_expand_dflash_reference(buffers, next_token_ids, target_positions, block_table, block_size,
                                                query_start_loc, num_rejected, 9, num_speculative_tokens)
    max_tokens_per_req = 5 + num_query_per_req
    _copy_and_expand_dflash_inputs(
        next_token_ids_ptr=next_token_ids, target_positions_ptr=target_positions,
        out_input_ids_ptr=buffers["input_ids"], out_context_positions_ptr=buffers["context_positions"],
        out_query_positions_ptr=buffers["query_positions"],
        out_context_slot_mapping_ptr=buffers["context_slot_mapping"],
        out_query_slot_mapping_ptr=buffers["query_slot_mapping"], out_token_indices_ptr=buffers["token_indices"],
        block_table_ptr=block_table, block_table_stride=block_table.stride(0), query_start_loc_ptr=query_start_loc,
        num_rejected_tokens_ptr=num_rejected if padded else 0, parallel_drafting_token_id=9, block_size=block_size,
        num_query_per_req=num_query_per_req, num_speculative_tokens=num_speculative_tokens,
        total_input_tokens=len(target_positions), max_tokens_per_req=max_tokens_per_req,
        triton_block_size=min(256, next_power_of_2(max_tokens_per_req)), has_num_rejected=padded)

    for name, buffer in buffers.items():
        assert buffer.tolist() == expected[name].tolist(), name


# -- rejection_sampler: greedy / random rejection, recovered tokens --------------------------------
#
# Inputs as `rejection_sample` passes them: int32 output (num_reqs, max_spec_len + 1) filled with
# -1, int32 cu_num_draft_tokens (numpy cumsum) and draft_token_ids (the scheduled drafts), int64
# target argmax, int32 (num_reqs, 1) bonus tokens from the sampler, bool is_greedy (None when all
# greedy), float32 contiguous probabilities, float64 uniform samples, no draft probabilities for
# EAGLE-style drafts (`draft_probs=None`) or float32 ones, float32 or float64 (use_fp64_gumbel)
# inverse exponential samples.
#
# Not tested, because vLLM never passes it on CPU: a draft id of -1. The Triton random-sampling
# kernel rejects such a draft outright and emits the recovered token; vLLM's C++ stand-in reads
# target_probs[row, -1] instead and can accept it, then keeps accepting the drafts after it. Drafts
# of -1 come only from the async scheduler (structured output pads grammar-invalid drafts with -1,
# Scheduler.update_draft_token_ids_in_output, reached through pending_structured_output_tokens,
# which only AsyncScheduler sets), and CpuPlatform.check_and_update_config forces
# async_scheduling off; the synchronous scheduler truncates invalid drafts instead.

CU_NUM_DRAFT_TOKENS = [3, 3, 5, 8]  # request 1 has no drafts this step (a prefill in the batch)


def greedy_reference(output, cu_num_draft_tokens, draft_token_ids, target_argmax, bonus_token_ids, is_greedy):
    out = output.clone()
    for request, (start, end) in enumerate(starts_and_ends(cu_num_draft_tokens)):
        if is_greedy is not None and not bool(is_greedy[request]):
            continue
        rejected = False
        for pos in range(end - start):
            out[request, pos] = int(target_argmax[start + pos])
            if int(draft_token_ids[start + pos]) != int(target_argmax[start + pos]):
                rejected = True
                break
        if not rejected:
            out[request, end - start] = int(bonus_token_ids.reshape(-1)[request])
    return out


def random_reference(output, cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs, bonus_token_ids,
                     recovered_token_ids, uniform_probs, is_greedy):
    out = output.clone()
    for request, (start, end) in enumerate(starts_and_ends(cu_num_draft_tokens)):
        if bool(is_greedy[request]):
            continue
        rejected = False
        for pos in range(end - start):
            token_index = start + pos
            draft = int(draft_token_ids[token_index])
            if draft < 0:
                accepted = False  # a padded draft is rejected outright
            else:
                draft_prob = draft_probs[token_index, draft] if draft_probs is not None else torch.tensor(1.0)
                target_prob = target_probs[token_index, draft]
                # The ratio in float32 (the kernel divides two float32 loads), compared in float64.
                accepted = bool(draft_prob > 0) and float(target_prob / draft_prob) >= float(uniform_probs[token_index])
            if accepted:
                out[request, pos] = draft
            else:
                out[request, pos] = int(recovered_token_ids[token_index])
                rejected = True
                break
        if not rejected:
            out[request, end - start] = int(bonus_token_ids.reshape(-1)[request])
    return out


def recovered_reference(cu_num_draft_tokens, draft_token_ids, draft_probs, target_probs, inv_q) -> list[int]:
    recovered = [None] * len(draft_token_ids)
    for request, (start, end) in enumerate(starts_and_ends(cu_num_draft_tokens)):
        for token_index in range(start, end):
            if draft_probs is None:
                prob = target_probs[token_index].clone()
                draft = int(draft_token_ids[token_index])
                if 0 <= draft < prob.shape[0]:
                    prob[draft] = 0
            else:
                prob = (target_probs[token_index] - draft_probs[token_index]).clamp(min=0)
            recovered[token_index] = int(torch.argmax(prob.to(inv_q.dtype) * inv_q[request]))  # first maximum
    return recovered


def sampling_inputs(vocab_size: int = 12, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    num_tokens = CU_NUM_DRAFT_TOKENS[-1]
    target_probs = (3 * torch.randn(num_tokens, vocab_size, generator=generator)).softmax(-1)
    draft_probs = (3 * torch.randn(num_tokens, vocab_size, generator=generator)).softmax(-1)
    # Mostly the target's argmax (as a good draft proposes), some other tokens.
    draft_token_ids = target_probs.argmax(-1).to(torch.int32)
    for token_index in (2, 5, 7):
        draft_token_ids[token_index] = (draft_token_ids[token_index] + 1 + token_index) % vocab_size
    return dict(
        cu_num_draft_tokens=torch.tensor(CU_NUM_DRAFT_TOKENS, dtype=torch.int32),
        draft_token_ids=draft_token_ids,
        target_probs=target_probs,
        draft_probs=draft_probs,
        bonus_token_ids=torch.tensor([[1], [2], [3], [4]], dtype=torch.int32),
        output=torch.full((4, 4), PAD_ID, dtype=torch.int32),
        uniform_probs=torch.rand(num_tokens, generator=generator, dtype=torch.float64),
    )


@pytest.mark.parametrize("all_greedy", [True, False])
def test_rejection_greedy_sample(all_greedy):
    from vllm.v1.sample.rejection_sampler import _rejection_greedy_sample

    inputs = sampling_inputs()
    output = inputs["output"]
    target_argmax = inputs["target_probs"].argmax(-1)
    is_greedy = None if all_greedy else torch.tensor([True, True, False, True])
    expected = greedy_reference(output, inputs["cu_num_draft_tokens"], inputs["draft_token_ids"], target_argmax,
                                inputs["bonus_token_ids"], is_greedy)
    _rejection_greedy_sample(output, inputs["cu_num_draft_tokens"], inputs["draft_token_ids"], target_argmax,
                             inputs["bonus_token_ids"], is_greedy, 3, None if all_greedy else inputs["uniform_probs"],
                             None)
    assert output.tolist() == expected.tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_draft_probs", [False, True], ids=["eagle", "draft-probs"])
def test_rejection_random_sample(with_draft_probs, seed):
    from vllm.v1.sample.rejection_sampler import _rejection_random_sample

    inputs = sampling_inputs(seed=seed)
    output = inputs["output"]
    draft_probs = inputs["draft_probs"] if with_draft_probs else None
    is_greedy = torch.tensor([False, False, True, False])
    recovered_token_ids = torch.tensor([11, 10, 9, 8, 7, 6, 5, 4], dtype=torch.int32)
    expected = random_reference(output, inputs["cu_num_draft_tokens"], inputs["draft_token_ids"], draft_probs,
                                inputs["target_probs"], inputs["bonus_token_ids"], recovered_token_ids,
                                inputs["uniform_probs"], is_greedy)
    _rejection_random_sample(output, inputs["cu_num_draft_tokens"], inputs["draft_token_ids"], draft_probs,
                             inputs["target_probs"], inputs["bonus_token_ids"], recovered_token_ids,
                             inputs["uniform_probs"], is_greedy, 3, None)
    assert output.tolist() == expected.tolist()


@pytest.mark.parametrize("with_draft_probs", [False, True], ids=["eagle", "draft-probs"])
@pytest.mark.parametrize("gumbel_dtype", [torch.float32, torch.float64])
def test_sample_recovered_tokens(with_draft_probs, gumbel_dtype):
    # With use_fp64_gumbel the CPU stand-in still rounds inv_q to float32 before the argmax; that
    # changes a recovered token only when two scores agree to float32 precision (not here).
    from vllm.v1.sample.rejection_sampler import _sample_recovered_tokens

    inputs = sampling_inputs()
    draft_probs = inputs["draft_probs"] if with_draft_probs else None
    generator = torch.Generator().manual_seed(1)
    inv_q = torch.empty(4, inputs["target_probs"].shape[1], dtype=gumbel_dtype).exponential_(generator=generator)
    inv_q = inv_q.reciprocal()
    recovered = torch.full_like(inputs["draft_token_ids"], STALE)
    _sample_recovered_tokens(recovered, inputs["cu_num_draft_tokens"], inputs["draft_token_ids"], draft_probs,
                             inputs["target_probs"], inv_q, max_spec_len=3)
    assert recovered.tolist() == recovered_reference(inputs["cu_num_draft_tokens"], inputs["draft_token_ids"],
                                                     draft_probs, inputs["target_probs"], inv_q)


# -- mamba_utils.batch_memcpy_kernel -------------------------------------------------------------


def test_batch_memcpy_copies_each_range():
    from vllm.v1.worker.mamba_utils import batch_memcpy

    source = torch.arange(64, dtype=torch.uint8)
    destination = torch.zeros(64, dtype=torch.uint8)
    overlapping = torch.arange(64, dtype=torch.uint8)  # copy [8, 40) onto [0, 32): left overlap
    pointers = [(source.data_ptr() + 4, destination.data_ptr() + 10, 20),
                (overlapping.data_ptr() + 8, overlapping.data_ptr(), 32)]
    src_ptrs, dst_ptrs, sizes = (torch.tensor(column, dtype=torch.int64) for column in zip(*pointers, strict=True))
    batch_memcpy(src_ptrs, dst_ptrs, sizes)

    expected_destination = [0] * 64
    expected_destination[10:30] = list(range(4, 24))
    expected_overlapping = list(range(64))
    expected_overlapping[0:32] = list(range(8, 40))
    assert destination.tolist() == expected_destination
    assert overlapping.tolist() == expected_overlapping

"""The draft's forward with its row buffers, against a straightforward recomputation (CPU, no engine).

`ViSpecDraftModel.forward`, `ViSpecDraftBody.forward`, `ViSpecDraftModel.fold_img_fc` and
`ViSpecAttention.forward` run as written, on stand-ins for vLLM's layers (plain torch modules; the
vLLM layers themselves are covered by the engine tests):

- after `fold_img_fc`, a text row's layer input is the published fusion fc([e ; img_fc([h ; g])])
  (to float32 rounding), with and without the fc/img_fc biases, g entering as its global image
  term from `compress_image`;
- the forward reads only the first `rows` entries of the buffers, puts compressed tokens in place
  of compressed rows' layer inputs, and hands the dropped flags to the layer; refilling the
  buffers in place changes the next call's result (nothing is cached);
- the key-mask channel removes dropped rows from attention exactly: every kept row's output
  equals causal attention over the kept rows only, and a dropped row gets zero weight.
"""

from __future__ import annotations

import copy
from types import MethodType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vispec_vllm.draft_model import ViSpecAttention, ViSpecDraftBody, ViSpecDraftModel

HIDDEN, MAX_ROWS = 16, 12
FOLD_TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fold and published fusion differ by float32 rounding only


class RecordingLayer(nn.Module):
    def forward(self, positions, layer_input, is_dropped_row):
        self.seen = (positions, layer_input.clone(), is_dropped_row.clone())
        return layer_input * 2


class StandInBody(nn.Module):
    """ViSpecDraftBody's forward on plain torch layers."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.fc, self.img_fc = nn.Linear(2 * HIDDEN, HIDDEN, bias=bias), nn.Linear(2 * HIDDEN, HIDDEN, bias=bias)
        self.layers, self.embed_tokens = nn.ModuleList([RecordingLayer()]), nn.Embedding(50, HIDDEN)

    forward = ViSpecDraftBody.forward


def stand_in_draft(bias: bool = True) -> tuple[SimpleNamespace, StandInBody]:
    """(a folded stand-in draft, a copy of its body as published, before the fold)."""
    torch.manual_seed(0)
    body = StandInBody(bias)
    published = copy.deepcopy(body)
    draft = SimpleNamespace(
        model=body, hidden_size=HIDDEN, imadpt=lambda embeds: embeds[:3],  # the adaptor: g is its third output
        global_image_projection=torch.zeros(HIDDEN, HIDDEN), global_image_term=torch.zeros(MAX_ROWS, HIDDEN),
        compressed_token=torch.zeros(MAX_ROWS, HIDDEN),
        is_compressed_row=torch.zeros(MAX_ROWS, dtype=torch.bool),
        is_dropped_row=torch.zeros(MAX_ROWS, dtype=torch.bool), flagged_rows=0)
    draft.imadpt.q = torch.zeros(1)  # compress_image casts the embeddings to the adaptor's dtype
    for method in ("embed_input_ids", "clear_row_inputs", "set_text_rows", "set_planned_rows", "fold_img_fc",
                   "compress_image"):
        setattr(draft, method, MethodType(getattr(ViSpecDraftModel, method), draft))
    draft.fold_img_fc()
    return draft, published


def published_layer_input(published: StandInBody, input_ids: torch.Tensor, hidden: torch.Tensor,
                          g: torch.Tensor) -> torch.Tensor:
    """The paper's text-row fusion with the weights as published: fc([e ; img_fc([h ; g])])."""
    fused = published.img_fc(torch.cat([hidden, g], -1))
    return published.fc(torch.cat([published.embed_tokens(input_ids), fused], -1))


def terms(draft: SimpleNamespace, g: torch.Tensor) -> torch.Tensor:
    """Each row's g as `compress_image` hands it to the proposer (the adaptor's last output)."""
    return torch.stack([draft.compress_image(torch.cat([torch.zeros(2, HIDDEN), row[None]]))[1] for row in g])


def fill(draft, g: torch.Tensor, tokens: torch.Tensor, compressed: list[int], dropped: list[int]) -> None:
    rows = g.shape[0]
    draft.global_image_term[:rows] = terms(draft, g)
    draft.compressed_token[:rows] = tokens
    draft.is_compressed_row.zero_()
    draft.is_compressed_row[compressed] = True
    draft.is_dropped_row.zero_()
    draft.is_dropped_row[dropped] = True
    draft.flagged_rows = MAX_ROWS  # flags written past the setters


@torch.no_grad()
@pytest.mark.parametrize("bias", [True, False])
def test_forward_reads_the_row_buffers(bias):
    draft, published = stand_in_draft(bias)
    rows = 7
    input_ids, positions, hidden = torch.randint(0, 50, (rows,)), torch.arange(rows), torch.randn(rows, HIDDEN)
    for seed in (1, 2):  # refilled in place between calls, as the proposer does every step
        torch.manual_seed(seed)
        g, tokens = torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN)
        compressed, dropped = ([3], [1, 2]) if seed == 1 else ([2], [0])
        fill(draft, g, tokens, compressed, dropped)
        # Stale content past `rows` must not matter.
        draft.global_image_term[rows:] = 99.0
        draft.is_compressed_row[rows:] = True
        out, out_again = ViSpecDraftModel.forward(draft, input_ids, positions, hidden)

        expected = published_layer_input(published, input_ids, hidden, g)
        expected[compressed] = tokens[compressed]
        seen_positions, seen_input, seen_dropped = draft.model.layers[0].seen
        torch.testing.assert_close(seen_input, expected, **FOLD_TOLERANCE)
        assert torch.equal(seen_input[compressed], tokens[compressed])  # compressed rows bypass fc exactly
        assert seen_dropped.tolist() == [i in dropped for i in range(rows)]
        assert torch.equal(seen_positions, positions)
        assert torch.equal(out, seen_input * 2)
        assert out_again is out


@torch.no_grad()
def test_img_fc_is_folded_away():
    """After the fold the forward reads fc alone: img_fc holds zeros, and g reaches a row only
    through the global image projection (zero g, zero term)."""
    draft, published = stand_in_draft()
    assert not draft.model.img_fc.weight.any() and not draft.model.img_fc.bias.any()
    assert not draft.compress_image(torch.zeros(3, HIDDEN))[1].any()
    torch.testing.assert_close(draft.global_image_projection,
                               published.fc.weight[:, HIDDEN:] @ published.img_fc.weight[:, HIDDEN:], rtol=0, atol=0)


@torch.no_grad()
def test_cleared_buffers_mean_no_image():
    draft, published = stand_in_draft()
    rows = 5
    fill(draft, torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN), [1], [0])
    draft.clear_row_inputs()
    input_ids, hidden = torch.randint(0, 50, (rows,)), torch.randn(rows, HIDDEN)
    ViSpecDraftModel.forward(draft, input_ids, torch.arange(rows), hidden)
    no_image = published_layer_input(published, input_ids, hidden, hidden * 0)
    _, seen_input, seen_dropped = draft.model.layers[0].seen
    torch.testing.assert_close(seen_input, no_image, **FOLD_TOLERANCE)
    assert not seen_dropped.any()


@torch.no_grad()
def test_row_setters_fill_the_buffers_the_forward_reads():
    draft, _ = stand_in_draft()
    # Tables as the proposer builds them: a zero last entry, the rows of no image.
    terms = torch.cat((torch.randn(3, HIDDEN), torch.zeros(1, HIDDEN)))
    tokens = torch.cat((torch.randn(4, HIDDEN), torch.zeros(1, HIDDEN)))
    draft.set_planned_rows(terms, torch.tensor([3, 0, 2, 1, 0]), tokens, torch.tensor([4, 4, 3, 0, 4]),
                           torch.tensor([False, False, True, True, False]),
                           torch.tensor([True, True, False, False, False]))
    g = terms[[3, 0, 2, 1, 0]]
    assert torch.equal(draft.global_image_term[:5], g)
    assert draft.is_dropped_row.tolist()[:5] == [True, True, False, False, False]
    assert draft.is_compressed_row.tolist()[:5] == [False, False, True, True, False]
    assert torch.equal(draft.compressed_token[2], tokens[3]) and torch.equal(draft.compressed_token[3], tokens[0])
    assert not draft.compressed_token[[0, 1, 4]].any()  # rows that hold no compressed token read zero
    # The chain's rows: text rows adding the given terms; the rows past them are padding, cleared apart.
    draft.set_text_rows(g[3:5])
    draft.clear_row_inputs(2, MAX_ROWS)
    assert torch.equal(draft.global_image_term[:2], g[3:5]) and not draft.global_image_term[2:].any()
    assert not draft.is_dropped_row.any() and not draft.is_compressed_row.any()
    assert not draft.compressed_token[2:].any()


@torch.no_grad()
def test_text_rows_clear_every_flag_a_planned_step_left():
    # The setters skip clearing flags that no setter has set since the last clear; whatever the
    # order of planned, text and padding rows, the flags equal those of a full rewrite.
    draft, _ = stand_in_draft()
    terms, tokens = torch.randn(3, HIDDEN), torch.randn(2, HIDDEN)
    draft.set_planned_rows(terms, torch.zeros(6, dtype=torch.long), tokens, torch.ones(6, dtype=torch.long),
                           torch.tensor([0, 1, 0, 0, 1, 1]), torch.tensor([1, 0, 1, 1, 0, 0]))
    assert draft.is_compressed_row.tolist()[:6] == [False, True, False, False, True, True]
    draft.set_text_rows(terms[:2])  # two chain rows: rows 2-5 keep their flags until cleared
    assert not draft.is_compressed_row[:2].any() and not draft.is_dropped_row[:2].any()
    assert draft.is_compressed_row[4] and draft.is_dropped_row[2]
    draft.clear_row_inputs(3, 4)  # padding inside the flagged rows: rows 4-5 still flagged
    draft.set_text_rows(terms[:3])
    assert draft.is_compressed_row[4] and draft.is_compressed_row[5]
    draft.clear_row_inputs(3, MAX_ROWS)  # the padding after them clears the rest
    assert not draft.is_compressed_row.any() and not draft.is_dropped_row.any()
    draft.set_planned_rows(terms, torch.zeros(4, dtype=torch.long), tokens, torch.ones(4, dtype=torch.long),
                           torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 0, 0]))
    draft.set_text_rows(terms[:3].repeat(2, 1))  # six text rows cover all four flagged ones
    assert not draft.is_compressed_row.any() and not draft.is_dropped_row.any()
    assert draft.flagged_rows == 0


def stand_in_attention(num_heads: int, head_dim: int, padded_head_dim: int) -> SimpleNamespace:
    torch.manual_seed(3)
    size = num_heads * head_dim
    qkv, o_proj = nn.Linear(HIDDEN, 3 * size), nn.Linear(size, HIDDEN, bias=False)

    def causal_attention(q, k, v):  # what vLLM's Attention computes for one prefill, unmasked
        rows = q.shape[0]
        q, k, v = (t.view(rows, num_heads, padded_head_dim).transpose(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim**-0.5)
        return out.transpose(0, 1).reshape(rows, -1)

    attention = SimpleNamespace(
        qkv_proj=lambda x: (qkv(x), None), o_proj=lambda x: (o_proj(x), None),
        rotary_emb=lambda positions, q, k: (q, k), attn=causal_attention, num_local_heads=num_heads,
        head_dim=head_dim, padded_head_dim=padded_head_dim, weights=(qkv, o_proj))
    attention.padded_heads = MethodType(ViSpecAttention.padded_heads, attention)
    return attention


@torch.no_grad()
def test_key_mask_channel_removes_dropped_rows_exactly():
    num_heads, head_dim, padded = 2, 8, 16
    attention = stand_in_attention(num_heads, head_dim, padded)
    rows = 9
    x = torch.randn(rows, HIDDEN)
    dropped = torch.zeros(rows, dtype=torch.bool)
    dropped[[1, 2, 3, 6]] = True
    out = ViSpecAttention.forward(attention, torch.arange(rows), x, dropped)

    qkv, o_proj = attention.weights
    q, k, v = (t.view(rows, num_heads, head_dim).transpose(0, 1) for t in qkv(x).split(num_heads * head_dim, -1))
    kept = (~dropped).nonzero().squeeze(1)
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    allowed = torch.ones(rows, rows, dtype=torch.bool).tril() & ~dropped[None, :]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = o_proj((weights @ v).transpose(0, 1).reshape(rows, -1))
    torch.testing.assert_close(out[kept], expected[kept], rtol=1e-5, atol=1e-6)
    # Without flags nothing is masked: plain causal attention.
    plain = ViSpecAttention.forward(attention, torch.arange(rows), x, torch.zeros(rows, dtype=torch.bool))
    causal = scores.masked_fill(~torch.ones(rows, rows, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    torch.testing.assert_close(plain, o_proj((causal @ v).transpose(0, 1).reshape(rows, -1)), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_dropped_rows_get_zero_attention_weight():
    """The weights the padded query and key give, row by row: exactly zero on every dropped key, and
    on the kept keys a direct softmax over the kept keys alone (the weights they had before)."""
    num_heads, head_dim, padded = 2, 8, 16
    attention = stand_in_attention(num_heads, head_dim, padded)
    rows = 9
    dropped = torch.zeros(rows, dtype=torch.bool)
    dropped[[1, 2, 3, 6]] = True
    q, k = torch.randn(rows, num_heads * head_dim), torch.randn(rows, num_heads * head_dim)
    padded_q, padded_k, _ = (t.view(rows, num_heads, padded).transpose(0, 1)
                             for t in attention.padded_heads(torch.cat((q, k, torch.zeros_like(q)), 1), dropped))
    causal = torch.ones(rows, rows, dtype=torch.bool).tril()
    weights = ((padded_q @ padded_k.transpose(-1, -2)) * head_dim**-0.5).masked_fill(~causal, float("-inf")).softmax(-1)

    assert torch.equal(weights[..., dropped], torch.zeros_like(weights[..., dropped]))
    plain_q, plain_k = (t.view(rows, num_heads, head_dim).transpose(0, 1) for t in (q, k))
    kept_scores = ((plain_q @ plain_k.transpose(-1, -2)) * head_dim**-0.5).masked_fill(~causal | dropped[None, :],
                                                                                      float("-inf"))
    torch.testing.assert_close(weights[..., ~dropped], kept_scores.softmax(-1)[..., ~dropped], rtol=1e-6, atol=1e-7)


@torch.no_grad()
@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
], ids=["default", "llama3"])
@pytest.mark.parametrize("implementation", ["forward_native", "forward_cpu"])
def test_rope_on_padded_heads_turns_what_it_turns_unpadded(rope_parameters, implementation):
    """The draft runs RoPE on its padded heads as a partial rotary of head_dim channels: the first
    head_dim channels come out as unpadded RoPE gives them, the mask channel and padding unchanged."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    num_heads, head_dim, padded, rows = 2, 32, 64, 7
    with set_current_vllm_config(VllmConfig()):
        plain = get_rope(head_dim, max_position=4096, rope_parameters=dict(rope_parameters), is_neox_style=True)
        partial = get_rope(padded, max_position=4096, rope_parameters={**rope_parameters, "rope_dim": head_dim},
                           is_neox_style=True)
    positions = torch.tensor([0, 1, 5, 17, 300, 1000, 4000])
    q, k = torch.randn(rows, num_heads, padded), torch.randn(rows, num_heads, padded)
    plain_q, plain_k = getattr(plain, implementation)(positions, q[..., :head_dim].reshape(rows, -1).clone(),
                                                      k[..., :head_dim].reshape(rows, -1).clone())
    turned_q, turned_k = getattr(partial, implementation)(positions, q.reshape(rows, -1).clone(),
                                                          k.reshape(rows, -1).clone())
    for turned, expected, original in ((turned_q, plain_q, q), (turned_k, plain_k, k)):
        turned = turned.view(rows, num_heads, padded)
        torch.testing.assert_close(turned[..., :head_dim], expected.view(rows, num_heads, head_dim), rtol=0, atol=0)
        assert torch.equal(turned[..., head_dim:], original[..., head_dim:])

"""The draft's forward with its row buffers, against a straightforward recomputation (CPU, no engine).

`ViSpecDraftModel.forward` and `ViSpecAttention.forward` run as written, on stand-ins for vLLM's
layers (plain torch modules; the vLLM layers themselves are covered by the engine tests):

- the forward reads only the first `rows` entries of the buffers, puts compressed tokens in place
  of compressed rows' layer inputs, fuses g through img_fc, and hands the dropped flags to the
  layer; refilling the buffers in place changes the next call's result (nothing is cached);
- the key-mask channel removes dropped rows from attention exactly: every kept row's output
  equals causal attention over the kept rows only.
"""

from __future__ import annotations

from types import MethodType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from vispec_vllm.draft_model import ViSpecAttention, ViSpecDraftModel

HIDDEN, MAX_ROWS = 16, 12


class RecordingLayer(nn.Module):
    def forward(self, positions, layer_input, is_dropped_row):
        self.seen = (positions, layer_input.clone(), is_dropped_row.clone())
        return layer_input * 2


def stand_in_draft() -> SimpleNamespace:
    torch.manual_seed(0)
    draft = SimpleNamespace(
        model=SimpleNamespace(fc=nn.Linear(2 * HIDDEN, HIDDEN), img_fc=nn.Linear(2 * HIDDEN, HIDDEN),
                              layers=[RecordingLayer()], embed_tokens=nn.Embedding(50, HIDDEN)),
        global_image_feature=torch.zeros(MAX_ROWS, HIDDEN), compressed_token=torch.zeros(MAX_ROWS, HIDDEN),
        is_compressed_row=torch.zeros(MAX_ROWS, dtype=torch.bool),
        is_dropped_row=torch.zeros(MAX_ROWS, dtype=torch.bool))
    for method in ("embed_input_ids", "clear_row_inputs", "set_text_rows", "set_planned_rows"):
        setattr(draft, method, MethodType(getattr(ViSpecDraftModel, method), draft))
    return draft


def fill(draft, g: torch.Tensor, tokens: torch.Tensor, compressed: list[int], dropped: list[int]) -> None:
    rows = g.shape[0]
    draft.global_image_feature[:rows] = g
    draft.compressed_token[:rows] = tokens
    draft.is_compressed_row.zero_()
    draft.is_compressed_row[compressed] = True
    draft.is_dropped_row.zero_()
    draft.is_dropped_row[dropped] = True


@torch.no_grad()
def test_forward_reads_the_row_buffers():
    draft = stand_in_draft()
    rows = 7
    input_ids, positions, hidden = torch.randint(0, 50, (rows,)), torch.arange(rows), torch.randn(rows, HIDDEN)
    # Stale content past `rows` must not matter.
    draft.global_image_feature[rows:] = 99.0
    draft.is_compressed_row[rows:] = True
    for seed in (1, 2):  # refilled in place between calls, as the proposer does every step
        torch.manual_seed(seed)
        g, tokens = torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN)
        compressed, dropped = ([3], [1, 2]) if seed == 1 else ([2], [0])
        fill(draft, g, tokens, compressed, dropped)
        draft.global_image_feature[rows:] = 99.0
        out, out_again = ViSpecDraftModel.forward(draft, input_ids, positions, hidden)

        fc, img_fc = draft.model.fc, draft.model.img_fc
        expected = fc(torch.cat([draft.model.embed_tokens(input_ids), img_fc(torch.cat([hidden, g], -1))], -1))
        expected[compressed] = tokens[compressed]
        seen_positions, seen_input, seen_dropped = draft.model.layers[0].seen
        torch.testing.assert_close(seen_input, expected, rtol=0, atol=0)
        assert seen_dropped.tolist() == [i in dropped for i in range(rows)]
        assert torch.equal(seen_positions, positions)
        torch.testing.assert_close(out, expected * 2, rtol=0, atol=0)
        assert out_again is out


@torch.no_grad()
def test_cleared_buffers_mean_no_image():
    draft = stand_in_draft()
    rows = 5
    fill(draft, torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN), [1], [0])
    draft.clear_row_inputs()
    input_ids, hidden = torch.randint(0, 50, (rows,)), torch.randn(rows, HIDDEN)
    ViSpecDraftModel.forward(draft, input_ids, torch.arange(rows), hidden)
    fc, img_fc = draft.model.fc, draft.model.img_fc
    no_image = fc(torch.cat([draft.model.embed_tokens(input_ids), img_fc(torch.cat([hidden, hidden * 0], -1))], -1))
    _, seen_input, seen_dropped = draft.model.layers[0].seen
    torch.testing.assert_close(seen_input, no_image, rtol=0, atol=0)
    assert not seen_dropped.any()


@torch.no_grad()
def test_row_setters_fill_the_buffers_the_forward_reads():
    draft = stand_in_draft()
    g, tokens = torch.randn(5, HIDDEN), torch.randn(4, HIDDEN)  # compressed-token table, as a row plan indexes it
    draft.set_planned_rows(g, torch.tensor([True, True, False, False, False]), torch.tensor([-1, -1, 3, 0, -1]),
                           tokens)
    assert torch.equal(draft.global_image_feature[:5], g)
    assert draft.is_dropped_row.tolist()[:5] == [True, True, False, False, False]
    assert draft.is_compressed_row.tolist()[:5] == [False, False, True, True, False]
    assert torch.equal(draft.compressed_token[2], tokens[3]) and torch.equal(draft.compressed_token[3], tokens[0])
    # The chain's rows: text rows fusing the given g; the rows past them are padding, cleared apart.
    draft.set_text_rows(g[3:5])
    draft.clear_row_inputs(2, MAX_ROWS)
    assert torch.equal(draft.global_image_feature[:2], g[3:5]) and not draft.global_image_feature[2:].any()
    assert not draft.is_dropped_row.any() and not draft.is_compressed_row.any()
    assert not draft.compressed_token[2:].any()


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
        qkv_proj=lambda x: (qkv(x), None), o_proj=lambda x: (o_proj(x), None), q_size=size,
        rotary_emb=lambda positions, q, k: (q, k), attn=causal_attention, num_local_heads=num_heads,
        head_dim=head_dim, padded_head_dim=padded_head_dim, weights=(qkv, o_proj))
    attention._pad = MethodType(ViSpecAttention._pad, attention)
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

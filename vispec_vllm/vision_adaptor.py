"""ViSpec's vision adaptor, once, for the served draft (`draft_model.py`) and for training
(`training/train.py`); no vLLM import (docs/method.md §2.2).

`num_q` learned queries attend, unmasked and without positions, over one image's target input
embeddings (the projected patch features). Output rows 0..num_q-2 are the image's compressed
tokens, row num_q-1 its global image feature g. Parameter names are the published checkpoint's
(`imadpt.q`, `imadpt.{k,v,o}_proj.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ViSpecVisionAdaptor(nn.Module):
    """`num_q` learned queries cross-attending (no mask) over one image's target input embeddings.

    Output rows 0..num_q-2 are the compressed image tokens; row num_q-1 is the global image feature.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, num_q: int, qkv_bias: bool) -> None:
        super().__init__()
        if num_q < 1:
            raise ValueError(f"num_q must be >= 1 (the last query is the global image feature), got {num_q}")
        self.num_heads, self.head_dim = num_heads, head_dim
        # What training starts from (unit-variance scores against unit-variance keys); a served
        # draft's checkpoint overwrites it. Drawn before the projections, as training always did.
        self.q = nn.Parameter(torch.randn(num_q, num_heads, head_dim) * head_dim**-0.5)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    @property
    def num_q(self) -> int:
        return self.q.shape[0]

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[num_q, hidden] for one image's embeddings [tokens, hidden]."""
        num_tokens = image_embeds.shape[0]
        keys = self.k_proj(image_embeds).view(num_tokens, self.num_heads, self.head_dim).transpose(0, 1)
        values = self.v_proj(image_embeds).view(num_tokens, self.num_heads, self.head_dim).transpose(0, 1)
        queries = self.q.transpose(0, 1).to(keys.dtype)
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=False)
        return self.o_proj(out.transpose(0, 1).reshape(self.num_q, -1))

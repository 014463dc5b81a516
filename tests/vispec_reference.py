"""An independent, pure-PyTorch ViSpec draft, written from the method (docs/method.md §2-§3),
used only to check the plugin. It calls no plugin code and shares none of its tricks: it builds
the compressed row sequence explicitly (image rows removed, compressed tokens inserted at the
positions of the image's last num_q-1 rows) and recomputes full causal attention every time.
A draft whose config.json says `vispec_keep_image_rows` (the training ablation that drops no image
row) keeps the image rows other than the compressed ones, as text rows that fuse g = 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class ReferenceViSpecDraft:
    def __init__(self, draft_dir: Path, lm_head: torch.Tensor) -> None:
        config = json.loads((draft_dir / "config.json").read_text())
        self.w = {k: v.float() for k, v in load_file(draft_dir / "model.safetensors").items()}
        self.lm_head = lm_head.float()
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.head_dim = self.hidden // self.heads
        self.eps = config["rms_norm_eps"]
        self.theta = config.get("rope_theta", 10000.0)
        self.num_q = self.w["imadpt.q"].shape[0]
        # Spelled out, not imported: the reference reads the checkpoint as its format documents it.
        self.keep_image_rows = config.get("vispec_keep_image_rows", False)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def adaptor(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[num_q, H]: rows 0..q-2 compressed tokens, row q-1 the global image feature g."""
        n = image_embeds.shape[0]
        k = self._linear(image_embeds, "imadpt.k_proj").view(n, self.heads, self.head_dim).transpose(0, 1)
        v = self._linear(image_embeds, "imadpt.v_proj").view(n, self.heads, self.head_dim).transpose(0, 1)
        q = self.w["imadpt.q"].transpose(0, 1)  # [heads, q, hd]
        attn = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1) @ v
        return self._linear(attn.transpose(0, 1).reshape(self.num_q, -1), "imadpt.o_proj")

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = positions.double()[:, None] * inv_freq[None]
        cos = torch.cat([angles.cos(), angles.cos()], -1).float()[:, None]
        sin = torch.cat([angles.sin(), angles.sin()], -1).float()[:, None]
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def layer(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decoder layer 0 over a full row sequence with a plain causal mask (no input norm)."""
        n = x.shape[0]
        prefix = "layers.0.self_attn"
        q = self._rope(self._linear(x, f"{prefix}.q_proj").view(n, self.heads, self.head_dim), positions)
        k = self._rope(self._linear(x, f"{prefix}.k_proj").view(n, self.heads, self.head_dim), positions)
        v = self._linear(x, f"{prefix}.v_proj").view(n, self.heads, self.head_dim)
        scores = torch.einsum("qhd,khd->hqk", q, k) / self.head_dim**0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).reshape(n, -1)
        x = x + self._linear(attn, f"{prefix}.o_proj")
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = normed * self.w["layers.0.post_attention_layernorm.weight"]
        mlp = self._linear(F.silu(self._linear(normed, "layers.0.mlp.gate_proj"))
                           * self._linear(normed, "layers.0.mlp.up_proj"), "layers.0.mlp.down_proj")
        return x + mlp

    def _text_row(self, next_token: int, hidden: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        fused = self._linear(torch.cat([hidden, g]), "img_fc")
        return self._linear(torch.cat([self.w["embed_tokens.weight"][next_token], fused]), "fc")

    def _g_before(self, image_info: list, row: int) -> torch.Tensor:
        """g of the most recent image whose rows end at or before `row`; zeros before any image."""
        done = [im for im in image_info if im[1] <= row]
        return done[-1][3] if done else torch.zeros(self.hidden)

    def propose(self, tokens: list[int], target_hidden: dict[int, torch.Tensor],
                images: list[tuple[int, int, torch.Tensor]], last_row: int, k: int) -> list[int]:
        """Draft k tokens after the draft has seen rows 0..last_row.

        tokens: the committed token ids x_0..x_{last_row+1}; target_hidden[i] = h_i;
        images: (offset, length, target input embeddings) for each image in the prompt.
        """
        # Per image: its rows [offset-1, offset+length-1), compressed tokens, global feature g.
        image_info = []
        for offset, length, embeds in images:
            adapted = self.adaptor(embeds.float())
            image_info.append((offset - 1, offset + length - 1, adapted[:-1], adapted[-1]))
        rows, positions = [], []
        for i in range(last_row + 1):
            image = next((im for im in image_info if im[0] <= i < im[1]), None)
            if image is not None:
                _, end_row, compressed, _ = image
                j = i - (end_row - (self.num_q - 1))  # compressed tokens take the last q-1 rows
                if j >= 0:
                    rows.append(compressed[j])
                    positions.append(i)
                elif self.keep_image_rows:
                    rows.append(self._text_row(tokens[i + 1], target_hidden[i], torch.zeros(self.hidden)))
                    positions.append(i)
                continue  # else every other image row is dropped
            rows.append(self._text_row(tokens[i + 1], target_hidden[i], self._g_before(image_info, i)))
            positions.append(i)
        g = self._g_before(image_info, last_row + 1)
        proposals = []
        for step in range(k):
            out = self.layer(torch.stack(rows), torch.tensor(positions))
            token = int(torch.argmax(out[-1] @ self.lm_head.T))
            proposals.append(token)
            rows.append(self._text_row(token, out[-1], g))
            positions.append(last_row + 1 + step)
        return proposals


def target_lm_head(target_dir: Path) -> torch.Tensor:
    weights = load_file(target_dir / "model.safetensors")
    return next(v for k, v in weights.items() if k.endswith("lm_head.weight"))

"""The ViSpec draft as a vLLM model: one EAGLE-style decoder layer, a vision adaptor and `img_fc`.

Row i of the draft's input pairs the target's final-norm hidden state h_i with the embedding of
the next token x_{i+1}:

    text row        z_i = fc([embed(x_{i+1}) ; img_fc([h_i ; g])])   g: global image feature
    compressed row  z_i = A[r]                                        adaptor output, bypasses fc
    dropped row     an image row other than the last num_q-1: its key is hidden from every query

(num_q = 1: no compressed row, every image row dropped. A draft whose config keeps image rows,
`ViSpecDraftConfig.keep_image_rows`, has no dropped row: those rows are text rows with g = 0.)

Both linear maps of a text row are affine, so the draft folds them once the weights are loaded
(`fold_img_fc`): with fc = [F_e | F_f] and img_fc = [I_h | I_g] (+ biases b_fc, b_img),

    z_i = [F_e | F_f I_h] [embed(x_{i+1}) ; h_i] + (b_fc + F_f b_img) + F_f I_g g

which is an EAGLE draft's fc over [embed ; h] plus one per-image vector, the global image term
F_f I_g g, computed when the image is compressed. A ViSpec step then costs what an EAGLE step
costs, plus one add. It is the text-row fusion of docs/method.md §3.2 reassociated: equal in exact
arithmetic, equal to float rounding otherwise (the recorded proposals of the three tiny families
and both demo pairs did not change). The published weights and the checkpoint format are unchanged.

Layer 0 has no input_layernorm, there is no final norm, and logits come from the target's lm_head
(shared by vLLM's EAGLE loader). Positions are the raw 1-D token index for every target family.

Dropped image rows are removed from attention exactly with a key-mask channel (see
`ViSpecAttention`): the draft's attention runs with one extra head channel in which every query
holds 1 and a dropped row's key holds -KEY_MASK_VALUE. The mask is thereby stored in the paged KV
cache itself, so it holds for later chunks, decode steps and prefix-cache hits on every attention
backend, CPU included, while draft slots stay equal to target positions. The padded head size
comes with the draft's `ViSpecDraftConfig` (vispec_vllm/checkpoint_format.py), which the draft
reads once, as it reads num_q, head_dim, the biases and the tensors the loader skips. Once a
request's rows lie past its images, its attention also skips the KV blocks that hold only dropped
rows (`ViSpecProposer.build_per_group_and_layer_attn_metadata`): zero weight either way, fewer keys
read, so the wider head costs less than it would over the whole context.

Which row is which reaches the draft through row buffers it owns (global image term, compressed
token, compressed and dropped flags), which `ViSpecProposer` fills in place before every forward.
`ViSpecDraftBody.forward` takes them as inputs, with no data-dependent branch, and runs under
vLLM's compilation as vLLM's own EAGLE draft does (`@support_torch_compile`, dynamic in the row
count; captured in CUDA graphs wherever vLLM captures its EAGLE draft). VISPEC_VLLM_EAGER_DRAFT=1
runs it eagerly instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsEagle
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix, process_eagle_weight

from vispec_vllm.checkpoint_format import (
    MODULE_NAME_PREFIXES,
    STACKED_PARAMETER_PARTS,
    VISPEC_DRAFT_CONFIG_ATTRIBUTE,
    ViSpecDraftConfig,
)
from vispec_vllm.vision_adaptor import ViSpecVisionAdaptor

logger = init_logger(__name__)

# Score penalty before scaling: times head_dim**-0.5 (>= 1/16 for head_dim <= 256) it is >= 625,
# far past exp underflow in fp32, and it is exactly representable in fp16 and bf16 KV caches.
KEY_MASK_VALUE = 1.0e4
EAGER_DRAFT_ENV = "VISPEC_VLLM_EAGER_DRAFT"


def eager_draft_forced() -> bool:
    """VISPEC_VLLM_EAGER_DRAFT=1: no compilation and no CUDA graphs for the ViSpec draft."""
    return os.environ.get(EAGER_DRAFT_ENV, "0") == "1"


class ViSpecAttention(nn.Module):
    """Multi-head attention whose keys carry a mask channel (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, config, vispec: ViSpecDraftConfig, prefix: str) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = vispec.head_dim
        self.padded_head_dim = vispec.masked_head_size  # head_dim channels, the mask channel, padding
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_heads,
                                          bias=vispec.qkv_bias, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size, bias=False,
                                        prefix=f"{prefix}.o_proj")
        self.num_local_heads = self.qkv_proj.num_heads
        rope_parameters = dict(getattr(config, "rope_parameters", None) or {})
        rope_parameters.setdefault("rope_type", "default")
        rope_parameters.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        # RoPE runs on the padded heads and turns their first head_dim channels only, as it turns
        # an unpadded head (a partial rotary of the padded size): the mask channel passes through.
        rotary_dim = rope_parameters.pop("rope_dim", None) or int(
            self.head_dim * rope_parameters.pop("partial_rotary_factor", 1.0))
        self.rotary_emb = get_rope(self.padded_head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters={**rope_parameters, "rope_dim": rotary_dim}, is_neox_style=True)
        self.attn = Attention(self.num_local_heads, self.padded_head_dim, self.head_dim**-0.5,
                              num_kv_heads=self.num_local_heads, cache_config=vllm_config.cache_config,
                              prefix=f"{prefix}.attn")

    def padded_heads(self, qkv: torch.Tensor, is_dropped_row: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v of `qkv` ([rows, 3 x heads x head_dim]) as heads padded to the attention's head
        size, made in one op: channel head_dim is the mask channel (1 in every query,
        -KEY_MASK_VALUE in a dropped row's key, 0 elsewhere), the rest zero. Few ops, because on a
        small draft each op's host cost shows."""
        rows = qkv.shape[0]
        padded = F.pad(qkv.view(rows, 3, self.num_local_heads, self.head_dim),
                       (0, self.padded_head_dim - self.head_dim))
        padded[:, 0, :, self.head_dim] = 1.0
        padded[:, 1, :, self.head_dim].masked_fill_(is_dropped_row[:, None], -KEY_MASK_VALUE)
        q, k, v = padded.view(rows, 3, -1).unbind(1)
        return q, k, v

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                is_dropped_row: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = self.padded_heads(qkv, is_dropped_row)
        q, k = self.rotary_emb(positions, q, k)
        rows = q.shape[0]
        out = self.attn(q, k, v).view(rows, self.num_local_heads, self.padded_head_dim)[..., : self.head_dim]
        output, _ = self.o_proj(out.reshape(rows, -1))
        return output


class ViSpecDecoderLayer(nn.Module):
    """ViSpec's layer 0: attention -> residual -> post_attention_layernorm -> SwiGLU -> residual.
    No input_layernorm (EAGLE's first layer skips it)."""

    def __init__(self, vllm_config: VllmConfig, config, vispec: ViSpecDraftConfig, prefix: str) -> None:
        super().__init__()
        self.self_attn = ViSpecAttention(vllm_config, config, vispec, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, prefix=f"{prefix}.mlp")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                is_dropped_row: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(positions, hidden_states, is_dropped_row)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "hidden_states": 0, "inputs_embeds": 0, "global_image_term": 0,
                      "compressed_token": 0, "is_compressed_row": 0, "is_dropped_row": 0},
    enable_if=lambda _vllm_config: not eager_draft_forced())
class ViSpecDraftBody(nn.Module):
    """embed_tokens, fc, img_fc and layer 0 (the names under `model.` in vLLM's EAGLE layout), and
    the compiled forward over one step's rows."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", config, vispec: ViSpecDraftConfig,
                 start_layer_id: int) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, vispec.has_bias
        dtype = vllm_config.model_config.dtype
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, prefix=f"{prefix}.embed_tokens")
        self.fc = ReplicatedLinear(2 * hidden, hidden, bias=bias, params_dtype=dtype, return_bias=False,
                                   prefix=f"{prefix}.fc")
        # Loaded as published, then folded into fc and the global image term (`fold_img_fc`).
        self.img_fc = ReplicatedLinear(2 * hidden, hidden, bias=bias, params_dtype=dtype, return_bias=False,
                                       prefix=f"{prefix}.img_fc")
        # The attention prefix must not collide with the target's layer names.
        self.layers = nn.ModuleList(
            [ViSpecDecoderLayer(vllm_config, config, vispec, prefix=f"{prefix}.layers.{start_layer_id}")])

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None, global_image_term: torch.Tensor, compressed_token: torch.Tensor,
                is_compressed_row: torch.Tensor, is_dropped_row: torch.Tensor) -> torch.Tensor:
        # No data-dependent branch: every row takes the same ops, whatever the row buffers hold
        # (a compiled or captured forward replays correctly after the buffers are refilled).
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        layer_input = self.fc(torch.cat((inputs_embeds, hidden_states), dim=-1)) + global_image_term
        layer_input = torch.where(is_compressed_row[:, None], compressed_token, layer_input)
        return self.layers[0](positions, layer_input, is_dropped_row)


class ViSpecDraftModel(nn.Module, SupportsEagle):
    """A published ViSpec draft, served by vLLM's EAGLE machinery with `ViSpecProposer` feeding it."""

    # The adaptor consumes the target's image embeddings itself (the proposer hands them over);
    # vLLM's merged draft input embeddings are not needed.
    supports_multimodal_embeddings = False
    # Published names -> module parameters, by the checkpoint format's tables.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked=STACKED_PARAMETER_PARTS,
                                      orig_to_new_prefix=MODULE_NAME_PREFIXES)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = config = vllm_config.speculative_config.draft_model_config.hf_config
        vispec = ViSpecDraftConfig.stored_in(config)
        if vispec is None:
            raise ValueError(f"the draft config has no {VISPEC_DRAFT_CONFIG_ATTRIBUTE!r}: a ViSpec draft is set up by "
                             "the plugin's speculative-config patch, from its checkpoint (give the draft directory "
                             "as the speculative model, with no method or method 'eagle')")
        self.vispec_config = vispec
        self.hidden_size = config.hidden_size
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = ViSpecDraftBody(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), config=config,
                                     vispec=vispec, start_layer_id=target_layers)
        self.imadpt = ViSpecVisionAdaptor(config.hidden_size, config.num_attention_heads, vispec.head_dim,
                                          vispec.num_q, vispec.qkv_bias)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        # What each input row is, filled in place by the proposer before every forward (the row
        # plan, vispec_vllm/row_plan.py); the forward reads the first `rows` entries. Sized like
        # vLLM's EAGLE input buffers (max_num_batched_tokens rows), so a captured forward reads
        # them at fixed addresses. Not weights: absent from the checkpoint and from load_weights.
        # All zero (no image anywhere) until the proposer first fills them, and in dummy runs.
        max_rows = vllm_config.scheduler_config.max_num_batched_tokens
        dtype = vllm_config.model_config.dtype
        # what each row's global image feature g adds to its layer input, F_f I_g g (zero: no image
        # before the row)
        self.register_buffer("global_image_term", torch.zeros(max_rows, self.hidden_size, dtype=dtype),
                             persistent=False)
        # F_f I_g, set by `fold_img_fc`: g -> its global image term
        self.register_buffer("global_image_projection", torch.zeros(self.hidden_size, self.hidden_size, dtype=dtype),
                             persistent=False)
        # the adaptor's compressed token that replaces a compressed row's layer input
        self.register_buffer("compressed_token", torch.zeros(max_rows, self.hidden_size, dtype=dtype),
                             persistent=False)
        self.register_buffer("is_compressed_row", torch.zeros(max_rows, dtype=torch.bool), persistent=False)
        # image rows hidden from every query through the key-mask channel (see ViSpecAttention)
        self.register_buffer("is_dropped_row", torch.zeros(max_rows, dtype=torch.bool), persistent=False)
        # Rows from here on hold no set flag (is_compressed_row, is_dropped_row), so the setters
        # clear only flags that may be set: host bookkeeping of the buffers above, kept beside them.
        self.flagged_rows = 0

    @property
    def num_q(self) -> int:
        return self.vispec_config.num_q

    @property
    def keep_image_rows(self) -> bool:
        """The rows are planned with no image row dropped (vispec_vllm/row_plan.py)."""
        return self.vispec_config.keep_image_rows

    def compress_image(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(compressed tokens [num_q-1, H], none for num_q = 1; global image term [H]) for one image:
        the adaptor's outputs, its last (the global image feature g) as it enters a text row, F_f I_g g."""
        adapted = self.imadpt(image_embeds.to(self.imadpt.q.dtype))
        return adapted[:-1], self.global_image_projection @ adapted[-1]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def clear_row_inputs(self, start: int = 0, end: int | None = None) -> None:
        """No image in rows [start, end): padding rows, and every row in dummy and profile runs."""
        if end is not None and end <= start:  # no padding rows: four ops saved on every forward
            return
        for buffer in (self.global_image_term, self.compressed_token, self.is_compressed_row, self.is_dropped_row):
            buffer[start:end].zero_()
        if end is None or end >= self.flagged_rows:
            self.flagged_rows = min(self.flagged_rows, start)

    def set_text_rows(self, global_image_term: torch.Tensor) -> None:
        """Rows [0, n) are text rows, row i adding global_image_term[i] ([n, H])."""
        rows = global_image_term.shape[0]
        self.global_image_term[:rows] = global_image_term
        flagged = min(rows, self.flagged_rows)
        if flagged:  # a chain step's rows mostly hold no flag already: two ops saved
            self.is_compressed_row[:flagged].zero_()
            self.is_dropped_row[:flagged].zero_()
            if rows >= self.flagged_rows:
                self.flagged_rows = 0

    def set_planned_rows(self, global_image_terms: torch.Tensor, global_term_row: torch.Tensor,
                         compressed_tokens: torch.Tensor, compressed_token_row: torch.Tensor,
                         is_compressed_row: torch.Tensor, is_dropped_row: torch.Tensor) -> None:
        """Rows [0, n) as a row plan says (vispec_vllm/row_plan.py): row i adds
        global_image_terms[global_term_row[i]], holds compressed_tokens[compressed_token_row[i]]
        where is_compressed_row[i], and is dropped where is_dropped_row[i]. The rows index the
        tables as they are: a row plan's -1 (no image) is the table's last entry, which is zero
        (`vispec_vllm.proposer_state.image_tables`); the caller maps it on the host, where such
        index work is cheaper than on the device. Indices and flags on the draft's device; gathers
        and copies only, so no step waits on the device (index_select straight into the buffers:
        a fraction of what advanced indexing costs on the host)."""
        rows = global_term_row.shape[0]
        torch.index_select(global_image_terms, 0, global_term_row, out=self.global_image_term[:rows])
        torch.index_select(compressed_tokens, 0, compressed_token_row, out=self.compressed_token[:rows])
        self.is_compressed_row[:rows] = is_compressed_row
        self.is_dropped_row[:rows] = is_dropped_row
        self.flagged_rows = max(self.flagged_rows, rows)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden_states.shape[0]
        out = self.model(input_ids, positions, hidden_states, inputs_embeds, self.global_image_term[:rows],
                         self.compressed_token[:rows], self.is_compressed_row[:rows], self.is_dropped_row[:rows])
        return out, out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader over the published names, mapped by the checkpoint format's tables; the
        tensors the checkpoint validator reported as unused are dropped by name."""
        skip_unused = WeightsMapper(orig_to_new_regex={re.compile(f"^{re.escape(name)}$"): None
                                                       for name in self.vispec_config.ignored_weights})
        loaded = AutoWeightsLoader(self).load_weights(weights, mapper=skip_unused | self.hf_to_vllm_mapper)
        self.fold_img_fc()
        for name in loaded:
            process_eagle_weight(self, name)  # notes an own embed_tokens, as vLLM's EAGLE drafts do
        if not self.has_own_embed_tokens:
            # vLLM's EAGLE loader then shares the target's input embedding with the draft.
            logger.warning("ViSpec draft checkpoint has no embed_tokens; using the target's input embedding")
            loaded.add("model.embed_tokens.weight")
        return loaded

    @torch.no_grad()
    def fold_img_fc(self) -> None:
        """Fold img_fc into fc and the global image projection (see the module docstring), in float32.
        Afterwards img_fc holds zeros: the forward no longer reads it."""
        fc, img_fc, hidden = self.model.fc, self.model.img_fc, self.hidden_size
        fc_weight, img_weight = fc.weight.float(), img_fc.weight.float()
        fused_half = fc_weight[:, hidden:]  # F_f
        if fc.bias is not None:
            fc.bias.copy_(fc.bias.float() + fused_half @ img_fc.bias.float())
            img_fc.bias.zero_()
        self.global_image_projection.copy_(fused_half @ img_weight[:, hidden:])
        fc.weight[:, hidden:] = fused_half @ img_weight[:, :hidden]
        img_fc.weight.zero_()


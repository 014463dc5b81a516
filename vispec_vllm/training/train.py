"""Training ViSpec drafts (docs/method.md §5): stage 1 (plain EAGLE-style draft, text rows only)
and stage 2 (ViSpec: vision adaptor, img_fc, multi-step unrolling on the draft's own outputs).

Both stages read the records of `train_data.py` and write checkpoints in the published format
(`config.json` + `model.safetensors`), so `vllm serve` loads them unchanged: a stage-1 checkpoint
as plain EAGLE (method "eagle"), a stage-2 checkpoint as ViSpec. One process trains on CPU; several
run under `torchrun` with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from vispec_vllm.checkpoint_format import (
    CONFIG_FILE,
    FAMILY_QKV_BIAS,
    LLAMA,
    WEIGHT_FILES,
    DraftDims,
    draft_config,
    eagle_shapes,
    published_shapes,
    target_family,
)
from vispec_vllm.row_plan import ImageSpans, plan_rows
from vispec_vllm.training.data import load_records


@dataclass
class TrainConfig:
    """Defaults are the published ones (README commands of the reference); tiny demos raise lr."""

    stage: int = 2
    epochs: int = 20
    lr: float = 3e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip_value: float = 0.5
    num_q: int = 2
    mtp_steps: int = 1
    noise_std: float = 0.2
    max_len: int = 4096
    fc_bias: bool = False  # False keeps the stage-1 draft servable by vLLM's own EAGLE (fc without bias)
    zero_adaptor: bool = False  # ablation: the adaptor's output is held at zero (no compressed tokens, g = 0)
    # Stage 2 only: keep stage 1's hidden-state regression beside the distribution loss (not in the
    # published recipe; our drafts' outputs feed back as inputs at chain steps >= 2).
    hidden_regression: bool = False
    # Per-sample steps are many small ops: one thread per process beats several (measured 15x on
    # 2 busy cores); a GPU run is unaffected.
    num_threads: int = 1
    seed: int = 0


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, dims: DraftDims, rope_theta: float) -> None:
        super().__init__()
        h, nh, hd = dims.hidden_size, dims.num_heads, dims.head_dim
        self.num_heads, self.head_dim, self.rope_theta = nh, hd, rope_theta
        self.q_proj = nn.Linear(h, nh * hd, bias=dims.qkv_bias)
        self.k_proj = nn.Linear(h, nh * hd, bias=dims.qkv_bias)
        self.v_proj = nn.Linear(h, nh * hd, bias=dims.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=x.device) / self.head_dim)
        angles = positions[:, None].float() * inv_freq[None]
        cos, sin = angles.cos().repeat(1, 2)[:, None], angles.sin().repeat(1, 2)[:, None]
        half = self.head_dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = self._rope(self.q_proj(x).view(n, self.num_heads, self.head_dim), positions)
        k = self._rope(self.k_proj(x).view(n, self.num_heads, self.head_dim), positions)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Layer 0 of an EAGLE draft: no input_layernorm."""

    def __init__(self, dims: DraftDims, rms_norm_eps: float, rope_theta: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dims, rope_theta)
        self.mlp = MLP(dims.hidden_size, dims.intermediate_size)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class ImageAdaptor(nn.Module):
    def __init__(self, dims: DraftDims, num_q: int) -> None:
        super().__init__()
        h, nh, hd = dims.hidden_size, dims.num_heads, dims.head_dim
        self.num_heads, self.head_dim = nh, hd
        self.q = nn.Parameter(torch.randn(num_q, nh, hd) * hd**-0.5)
        self.k_proj = nn.Linear(h, nh * hd, bias=dims.qkv_bias)
        self.v_proj = nn.Linear(h, nh * hd, bias=dims.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        n = image_embeds.shape[0]
        k = self.k_proj(image_embeds).view(n, self.num_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(image_embeds).view(n, self.num_heads, self.head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(self.q.transpose(0, 1), k, v)
        return self.o_proj(out.transpose(0, 1).reshape(self.q.shape[0], -1))


def image_runs(image_mask: torch.Tensor) -> ImageSpans:
    """The images of one training sequence: maximal runs [offset, offset + length) of placeholder tokens."""
    edges = torch.diff(image_mask.bool().to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))
    offset, end = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return ImageSpans(torch.zeros_like(offset), offset, end - offset)


class ViSpecTrainingDraft(nn.Module):
    """The ViSpec draft for training; parameter names are the published checkpoint's."""

    def __init__(self, dims: DraftDims, num_q: int, fc_bias: bool, rms_norm_eps: float, rope_theta: float,
                 embed_tokens: torch.Tensor) -> None:
        super().__init__()
        h = dims.hidden_size
        self.embed_tokens = nn.Embedding.from_pretrained(embed_tokens.float(), freeze=True)
        self.layers = nn.ModuleList([DecoderLayer(dims, rms_norm_eps, rope_theta)])
        self.fc = nn.Linear(2 * h, h, bias=fc_bias)
        self.imadpt = ImageAdaptor(dims, num_q)
        self.img_fc = nn.Linear(2 * h, h, bias=fc_bias)
        with torch.no_grad():  # identity on h, zero on g: an untrained img_fc changes nothing
            self.img_fc.weight.zero_()
            self.img_fc.weight[:, :h].copy_(torch.eye(h))
            if fc_bias:
                self.img_fc.bias.zero_()

    def forward(self, hidden: torch.Tensor, record: dict[str, torch.Tensor], use_vision: bool) -> tuple[torch.Tensor,
                                                                                                             torch.Tensor]:
        """Draft outputs for rows 0..L-2 (row i pairs `hidden[i]` with x_{i+1}), and which rows exist.

        use_vision=False is the plain EAGLE draft (stage 1): every row is a text row, z = fc([e ; h]).
        """
        ids = record["input_ids"]
        rows = len(ids) - 1
        next_embeds = self.embed_tokens(ids[1:])
        if not use_vision:
            out = self.layers[0](self.fc(torch.cat([next_embeds, hidden[:rows]], -1)), torch.arange(rows))
            return out, torch.ones(rows, dtype=torch.bool)
        # Which rows are dropped, compressed, or fuse which image's g: the row plan over the whole
        # sequence (one window [0, rows)), shared with the runtime proposer.
        spans = image_runs(record["image_mask"])
        embeds = record["inputs_embeds"].float()
        adapted = [self.imadpt(embeds[offset:offset + length])
                   for offset, length in zip(spans.offset.tolist(), spans.length.tolist(), strict=True)]
        plan = plan_rows(spans, self.imadpt.q.shape[0], torch.tensor([0, rows]), torch.tensor([0]))
        zero = hidden.new_zeros(1, hidden.shape[-1])  # index -1 of both tables: no image
        global_features = torch.cat([a[-1:] for a in adapted] + [zero])
        compressed_tokens = torch.cat([a[:-1] for a in adapted] + [zero])
        fused = self.img_fc(torch.cat([hidden[:rows], global_features[plan.global_feature_source]], -1))
        layer_inputs = self.fc(torch.cat([next_embeds, fused], -1))
        layer_inputs = torch.where((plan.compressed_index >= 0)[:, None], compressed_tokens[plan.compressed_index],
                                   layer_inputs)
        kept = ~plan.is_dropped
        positions = torch.arange(rows)[kept]
        out = torch.zeros(rows, hidden.shape[-1])
        out[kept] = self.layers[0](layer_inputs[kept], positions)
        return out, kept


def list_mle(draft_logits: torch.Tensor, target_logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Plackett-Luce loss of the target's top-k order, scored by the draft's logits."""
    order = target_logits.topk(k, dim=-1).indices
    scores = draft_logits.gather(-1, order)
    tail_lse = torch.logcumsumexp(scores.flip(-1), -1).flip(-1)
    return -(scores - tail_lse).sum(-1)


def draft_loss(out: torch.Tensor, rows: torch.Tensor, target_next_hidden: torch.Tensor, lm_head: torch.Tensor,
               stage: int, hidden_regression: bool = False) -> torch.Tensor:
    draft_logits = out[rows] @ lm_head.T
    target_logits = target_next_hidden[rows] @ lm_head.T
    p_target = target_logits.softmax(-1)
    rank_loss = list_mle(draft_logits, target_logits).mean()
    if stage == 1:
        regression = F.smooth_l1_loss(out[rows], target_next_hidden[rows])
        cross_entropy = -(p_target * draft_logits.log_softmax(-1)).sum(-1).mean()
        return regression + 0.1 * (cross_entropy + 0.1 * rank_loss)
    loss = 10 * (draft_logits.softmax(-1) - p_target).abs().sum(-1).mean() + 0.1 * rank_loss
    if hidden_regression:
        loss = loss + F.smooth_l1_loss(out[rows], target_next_hidden[rows])
    return loss


def read_target(target_dir: Path) -> tuple[DraftDims, str, dict, torch.Tensor, torch.Tensor]:
    """Draft dims, family, text config, input embedding and lm_head of a target checkpoint."""
    config = json.loads((target_dir / CONFIG_FILE).read_text())
    text = config.get("text_config", config)
    family = target_family(config["model_type"]) or LLAMA  # a target of another type gets a Llama draft
    heads = text["num_attention_heads"]
    dims = DraftDims(text["hidden_size"], heads, text["hidden_size"] // heads, text["intermediate_size"],
                     text["vocab_size"], FAMILY_QKV_BIAS[family])
    weights = load_file(target_dir / "model.safetensors")
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight") and "vision" not in k)
    lm_head = next(v for k, v in weights.items() if k.endswith("lm_head.weight"))
    return dims, family, text, embed.float(), lm_head.float()


def save_draft(model: ViSpecTrainingDraft, out_dir: Path, dims: DraftDims, family: str, cfg: TrainConfig) -> None:
    """The published format (vispec_vllm/checkpoint_format.py); a stage-1 draft holds only the EAGLE
    part, which vLLM serves as plain EAGLE."""
    out_dir.mkdir(parents=True, exist_ok=True)
    published = replace(dims, num_q=cfg.num_q, has_bias=cfg.fc_bias)
    names = eagle_shapes(published) if cfg.stage == 1 else published_shapes(published)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}
    if set(state) != set(names):
        raise RuntimeError(f"training draft lacks published weights: {sorted(set(names) - set(state))}")
    (out_dir / CONFIG_FILE).write_text(json.dumps(draft_config(published, family), indent=2) + "\n")
    save_file(state, out_dir / WEIGHT_FILES[0], metadata={"format": "pt"})
    (out_dir / "training_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def _learning_rate_factor(step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Linear warm-up over the first epoch, then linear decay to zero at the end."""
    if step < steps_per_epoch:
        return (step + 1) / steps_per_epoch
    return max(0.0, (total_steps - step) / max(1, total_steps - steps_per_epoch))


def train_draft(target_dir: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
                init_dir: str | Path | None = None) -> list[float]:
    """Train one stage; returns the mean loss of each epoch. Under torchrun, ranks share the data."""
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    dims, family, text, embed, lm_head = read_target(target_dir)
    rope_theta = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10000.0))
    model = ViSpecTrainingDraft(dims, cfg.num_q, cfg.fc_bias, text.get("rms_norm_eps", 1e-6), rope_theta, embed)
    if init_dir is not None:  # stage 2 starts from stage 1; the adaptor and img_fc from their init
        model.load_state_dict(load_file(Path(init_dir) / "model.safetensors"), strict=False)
    if cfg.zero_adaptor:
        with torch.no_grad():
            model.imadpt.o_proj.weight.zero_()
        for param in model.imadpt.parameters():
            param.requires_grad_(False)
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    records = [r for r in load_records(data_dir) if len(r["input_ids"]) <= cfg.max_len][rank::world]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(records)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, len(records), total_steps))
    use_vision = cfg.stage == 2
    epoch_losses = []
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(records), generator=generator).tolist()
        losses = []
        for index in tqdm(order, desc=f"stage {cfg.stage} epoch {epoch}", disable=rank != 0, leave=False):
            record = records[index]
            hidden = record["hidden_states"].float()
            length = len(record["input_ids"])
            # Row i is supervised when x_{i+2} was generated by the target (docs/method.md §5.3).
            rows = torch.zeros(length - 1, dtype=torch.bool)
            rows[: length - 2] = record["loss_mask"][2:].bool()
            target_next_hidden = torch.cat([hidden[1:], hidden[-1:]])[: length - 1]
            noisy = hidden + (torch.rand(hidden.shape, generator=generator) - 0.5) * cfg.noise_std * 512 / length
            loss_terms = []
            step_input = noisy
            for _ in range(1 + (cfg.mtp_steps if use_vision else 0)):
                out, kept = trained(step_input, record, use_vision)
                supervised = rows & kept
                if supervised.any():
                    loss_terms.append(draft_loss(out, supervised, target_next_hidden, lm_head, cfg.stage,
                                                 cfg.hidden_regression))
                # Next pass drafts from the draft's own outputs (row 0 keeps the target's h_0).
                step_input = torch.cat([noisy[:1], out[:-1], noisy[length - 1:]])
            if not loss_terms:
                continue
            loss = torch.stack(loss_terms).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip_value)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / max(1, len(losses)))
        if rank == 0:
            print(f"stage {cfg.stage} epoch {epoch}: loss {epoch_losses[-1]:.4f}", flush=True)
            save_draft(model, out_dir, dims, family, cfg)
    if world > 1:
        torch.distributed.barrier()
    return epoch_losses


"""Training ViSpec drafts (docs/method.md §5): stage 1 (plain EAGLE-style draft, text rows only)
and stage 2 (ViSpec: vision adaptor, img_fc, multi-step unrolling on the draft's own outputs).

Both stages read the records of `data.py` and write checkpoints in the published format
(`config.json` + `model.safetensors`), so `vllm serve` loads them unchanged: a stage-1 checkpoint
as plain EAGLE (method "eagle"), a stage-2 checkpoint as ViSpec. One process trains on CPU; several
run under `torchrun` with DistributedDataParallel (gloo on CPU, nccl on GPU).

Ablations, each changing one thing (off by default):
- `zero_adaptor` (stage 2): the adaptor's output is held at zero: no compressed tokens, g = 0;
- `keep_image_rows` (stage 2): no image row is dropped; the rows ViSpec drops become EAGLE rows
  (fc([e ; img_fc([h ; 0])])), the compressed rows and g stay (the row plan with `keep_image_rows`).
  Its checkpoint's config.json says so (`vispec_keep_image_rows`), and the plugin serves it that way;
- `drop_image_rows` (stage 1): every image row is dropped, so the EAGLE draft sees the image only
  through the target's hidden states at text rows. Its checkpoint is in the ViSpec layout with one
  adaptor query (no compressed token) and img_fc left at [I | 0], which is exactly that draft under
  the ViSpec row plan.
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
    VISPEC_PREFIXES,
    WEIGHT_FILES,
    DraftDims,
    draft_config,
    eagle_shapes,
    published_shapes,
)
from vispec_vllm.row_plan import ImageSpan, plan_rows
from vispec_vllm.target_checkpoint import TargetCheckpoint
from vispec_vllm.training.data import load_records
from vispec_vllm.vision_adaptor import ViSpecVisionAdaptor


@dataclass
class TrainConfig:
    """Defaults are the published ones (README commands of the reference); tiny demos raise lr."""

    stage: int = 2
    epochs: int = 20
    # Optimiser steps (one record each); None: `epochs` passes over the records. The learning rate
    # warms up linearly over the first 1/epochs of the steps, then decays linearly to zero.
    steps: int | None = None
    lr: float = 3e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip_value: float = 0.5
    num_q: int = 2
    mtp_steps: int = 1
    noise_std: float = 0.2
    max_len: int = 4096
    fc_bias: bool = False  # False keeps the stage-1 draft servable by vLLM's own EAGLE (fc without bias)
    zero_adaptor: bool = False  # ablation (stage 2): the adaptor's output is held at zero
    keep_image_rows: bool = False  # ablation (stage 2): no image row is dropped
    drop_image_rows: bool = False  # ablation (stage 1): every image row is dropped
    # Stage 2 only: keep stage 1's hidden-state regression beside the distribution loss (not in the
    # published recipe; our drafts' outputs feed back as inputs at chain steps >= 2).
    hidden_regression: bool = False
    # Per-sample steps are many small ops: one thread per process beats several (measured 15x on
    # 2 busy cores); a GPU run is unaffected.
    num_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (EAGLE-style) or 2 (ViSpec), got {self.stage}")
        stage2_only = [name for name in ("zero_adaptor", "keep_image_rows", "hidden_regression") if getattr(self, name)]
        if self.stage == 1 and stage2_only:
            raise ValueError(f"{', '.join(stage2_only)}: stage-2 options, but stage is 1")
        if self.stage == 2 and self.drop_image_rows:
            raise ValueError("drop_image_rows is the stage-1 ablation (stage 2 drops image rows already; "
                             "keep_image_rows is its opposite)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def uses_vision(self) -> bool:
        """Whether the draft runs the adaptor and img_fc (stage 2)."""
        return self.stage == 2

    @property
    def drops_image_rows(self) -> bool:
        """Whether image rows leave the draft's sequence: ViSpec's row plan, unless kept; in stage 1
        only for the `drop_image_rows` ablation."""
        return not self.keep_image_rows if self.stage == 2 else self.drop_image_rows

    @property
    def adaptor_queries(self) -> int:
        """The adaptor's queries: `num_q`, or one (no compressed token) for the stage-1 draft that
        drops image rows, whose ViSpec-layout checkpoint then serves as exactly that draft."""
        return 1 if self.drop_image_rows else self.num_q


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


def image_spans(image_mask: torch.Tensor) -> list[ImageSpan]:
    """The images of one training sequence: maximal runs [offset, offset + length) of placeholder tokens."""
    edges = torch.diff(image_mask.bool().to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))
    offsets, ends = torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()
    return [ImageSpan(offset, end - offset) for offset, end in zip(offsets, ends, strict=True)]


class ViSpecTrainingDraft(nn.Module):
    """The ViSpec draft for training; parameter names are the published checkpoint's."""

    def __init__(self, dims: DraftDims, num_q: int, fc_bias: bool, rms_norm_eps: float, rope_theta: float,
                 embed_tokens: torch.Tensor) -> None:
        super().__init__()
        h = dims.hidden_size
        self.embed_tokens = nn.Embedding.from_pretrained(embed_tokens.float(), freeze=True)
        self.layers = nn.ModuleList([DecoderLayer(dims, rms_norm_eps, rope_theta)])
        self.fc = nn.Linear(2 * h, h, bias=fc_bias)
        self.imadpt = ViSpecVisionAdaptor(h, dims.num_heads, dims.head_dim, num_q, dims.qkv_bias)
        self.img_fc = nn.Linear(2 * h, h, bias=fc_bias)
        with torch.no_grad():  # identity on h, zero on g: an untrained img_fc changes nothing
            self.img_fc.weight.zero_()
            self.img_fc.weight[:, :h].copy_(torch.eye(h))
            if fc_bias:
                self.img_fc.bias.zero_()

    def row_inputs(self, hidden: torch.Tensor, record: dict[str, torch.Tensor], use_vision: bool,
                   drop_image_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer input of rows 0..L-2 (row i pairs `hidden[i]` with x_{i+1}) and which rows exist.

        use_vision=False is the plain EAGLE draft (stage 1): every row is a text row, z = fc([e ; h]).
        use_vision=True is ViSpec: the row plan (docs/method.md §3) says which rows hold compressed
        tokens, which are dropped, and which image's g each text row fuses. drop_image_rows=False
        plans with `keep_image_rows` (the rows the plan drops stay, as text rows fusing no g), as the
        served draft does when its config says so; in stage 1, True drops every image row.
        """
        ids = record["input_ids"]
        rows = len(ids) - 1
        next_embeds = self.embed_tokens(ids[1:])
        spans = image_spans(record["image_mask"])
        # The row plan over the whole sequence (one window [0, rows)), shared with the runtime proposer.
        window = torch.tensor([0, rows]), torch.tensor([0])
        if not use_vision:
            layer_inputs = self.fc(torch.cat([next_embeds, hidden[:rows]], -1))
            if not drop_image_rows:
                return layer_inputs, torch.ones(rows, dtype=torch.bool)
            return layer_inputs, ~plan_rows(spans, 1, *window).is_dropped  # one query: no compressed row
        embeds = record["inputs_embeds"].float()
        adapted = [self.imadpt(embeds[span.offset:span.offset + span.length]) for span in spans]
        plan = plan_rows(spans, self.imadpt.num_q, *window, keep_image_rows=not drop_image_rows)
        zero = hidden.new_zeros(1, hidden.shape[-1])  # index -1 of both tables: no image
        global_features = torch.cat([a[-1:] for a in adapted] + [zero])
        compressed_tokens = torch.cat([a[:-1] for a in adapted] + [zero])
        fused = self.img_fc(torch.cat([hidden[:rows], global_features[plan.global_feature_source]], -1))
        layer_inputs = self.fc(torch.cat([next_embeds, fused], -1))
        layer_inputs = torch.where((plan.compressed_index >= 0)[:, None], compressed_tokens[plan.compressed_index],
                                   layer_inputs)
        return layer_inputs, ~plan.is_dropped

    def forward(self, hidden: torch.Tensor, record: dict[str, torch.Tensor], use_vision: bool,
                drop_image_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft outputs for rows 0..L-2 (zero at rows that do not exist) and which rows exist;
        the kept rows keep their positions (docs/method.md §3.2)."""
        layer_inputs, kept = self.row_inputs(hidden, record, use_vision, drop_image_rows)
        positions = torch.arange(len(kept))[kept]
        out = hidden.new_zeros(len(kept), hidden.shape[-1])
        out[kept] = self.layers[0](layer_inputs[kept], positions)
        return out, kept


def hold_adaptor_at_zero(model: ViSpecTrainingDraft) -> None:
    """The `zero_adaptor` ablation: the adaptor's output projection is zero and nothing of the
    adaptor trains, so its compressed tokens and g stay zero."""
    with torch.no_grad():
        model.imadpt.o_proj.weight.zero_()
    for param in model.imadpt.parameters():
        param.requires_grad_(False)


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


def supervised_rows(record: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row i is supervised when x_{i+2} was generated by the target (docs/method.md §5.3)."""
    length = len(record["input_ids"])
    rows = torch.zeros(length - 1, dtype=torch.bool)
    rows[: length - 2] = record["loss_mask"][2:].bool()
    return rows


def record_loss(model: nn.Module, record: dict[str, torch.Tensor], cfg: TrainConfig, lm_head: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss of one record: noisy target hidden states in, then `mtp_steps` more passes
    (stage 2) on the draft's own outputs, every pass trained towards the target (docs/method.md §5.4).
    `model` is the draft or its DistributedDataParallel wrapper."""
    hidden = record["hidden_states"].float()
    length = len(record["input_ids"])
    rows = supervised_rows(record)
    target_next_hidden = torch.cat([hidden[1:], hidden[-1:]])[: length - 1]
    noisy = hidden + (torch.rand(hidden.shape, generator=generator) - 0.5) * cfg.noise_std * 512 / length
    loss_terms = []
    step_input = noisy
    for _ in range(1 + (cfg.mtp_steps if cfg.uses_vision else 0)):
        out, kept = model(step_input, record, cfg.uses_vision, cfg.drops_image_rows)
        supervised = rows & kept
        if not supervised.any():
            raise ValueError("record has no supervised row the draft keeps (no generated answer after the prompt?)")
        loss_terms.append(draft_loss(out, supervised, target_next_hidden, lm_head, cfg.stage, cfg.hidden_regression))
        # Next pass drafts from the draft's own outputs (row 0 keeps the target's h_0).
        step_input = torch.cat([noisy[:1], out[:-1], noisy[length - 1:]])
    return torch.stack(loss_terms).mean()


def _init_from(model: ViSpecTrainingDraft, init_dir: Path) -> None:
    """Start from a checkpoint of this format: a stage-1 one leaves the ViSpec part at its
    initialisation (one that drops image rows holds an untrained ViSpec part of one query; it is not
    taken); one without fc/img_fc biases, when this draft has them, leaves them at zero (a no-op
    until trained). A checkpoint with biases this draft lacks is refused."""
    state = load_file(init_dir / WEIGHT_FILES[0])
    trained_as = init_dir / "training_config.json"
    if trained_as.is_file() and json.loads(trained_as.read_text())["stage"] == 1:
        state = {name: tensor for name, tensor in state.items() if not name.startswith(VISPEC_PREFIXES)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{init_dir}: weights the draft being trained does not have: {', '.join(unexpected)} "
                         "(a checkpoint with fc/img_fc biases needs fc_bias=True)")
    # The target's input embedding stands in for a checkpoint without one (docs/method.md §6.6).
    not_started = [name for name in missing
                   if not name.startswith(VISPEC_PREFIXES) and name not in ("fc.bias", "embed_tokens.weight")]
    if not_started:
        raise ValueError(f"{init_dir}: lacks weights the draft needs: {', '.join(not_started)}")
    if "fc.bias" in missing:
        with torch.no_grad():
            model.fc.bias.zero_()


def build_training_draft(target: TargetCheckpoint, cfg: TrainConfig, init_dir: str | Path | None = None
                         ) -> ViSpecTrainingDraft:
    """The draft `cfg` trains for `target`, seeded by `cfg.seed`, from `init_dir` if given (stage 2
    starts from stage 1), with the `zero_adaptor` ablation applied. RMS epsilon and RoPE theta are
    those of the draft config the checkpoint will carry, so training runs the forward vLLM serves."""
    torch.manual_seed(cfg.seed)
    serving = draft_config(target.draft_dims, target.family)
    model = ViSpecTrainingDraft(target.draft_dims, cfg.adaptor_queries, cfg.fc_bias, serving["rms_norm_eps"],
                                serving.get("rope_theta", 10000.0), target.input_embedding())
    if init_dir is not None:
        _init_from(model, Path(init_dir))
    if cfg.zero_adaptor:
        hold_adaptor_at_zero(model)
    return model


def save_draft(model: ViSpecTrainingDraft, out_dir: Path, dims: DraftDims, family: str, cfg: TrainConfig) -> None:
    """The published format (vispec_vllm/checkpoint_format.py); a plain stage-1 draft holds only the
    EAGLE part, which vLLM serves as plain EAGLE. A stage-2 draft that keeps its image rows says so
    in its config.json, so the plugin plans its rows as training did."""
    out_dir.mkdir(parents=True, exist_ok=True)
    published = replace(dims, num_q=model.imadpt.num_q, has_bias=cfg.fc_bias)
    eagle_layout = not cfg.uses_vision and not cfg.drops_image_rows
    names = eagle_shapes(published) if eagle_layout else published_shapes(published)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}
    if set(state) != set(names):
        raise RuntimeError(f"training draft lacks published weights: {sorted(set(names) - set(state))}")
    config = draft_config(published, family, keep_image_rows=cfg.keep_image_rows)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, out_dir / WEIGHT_FILES[0], metadata={"format": "pt"})
    (out_dir / "training_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over the first `warmup_steps`, then linear decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train_draft(target_dir: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
                init_dir: str | Path | None = None) -> list[float]:
    """Train one stage; returns the mean loss of each epoch (the last one possibly partial). Under
    torchrun, ranks share the data, each as many records and steps."""
    out_dir = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(cfg.num_threads)
    target = TargetCheckpoint.read(target_dir)
    lm_head = target.lm_head().float()
    model = build_training_draft(target, cfg, init_dir)
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    # Records with nothing to supervise would take no step; every rank gets as many records.
    usable = [r for r in load_records(data_dir) if len(r["input_ids"]) <= cfg.max_len and supervised_rows(r).any()]
    records = usable[: len(usable) // world * world][rank::world]
    if not records:
        raise ValueError(f"{data_dir}: no record of at most {cfg.max_len} tokens with a supervised row")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    total_steps = cfg.steps or cfg.epochs * len(records)
    warmup_steps = max(1, total_steps // cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, total_steps))
    epoch_losses = []
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    step = 0
    while step < total_steps:
        epoch = len(epoch_losses)
        order = torch.randperm(len(records), generator=generator).tolist()[: total_steps - step]
        losses = []
        for index in tqdm(order, desc=f"stage {cfg.stage} epoch {epoch}", disable=rank != 0, leave=False):
            loss = record_loss(trained, records[index], cfg, lm_head, generator)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip_value)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        step += len(order)
        epoch_losses.append(sum(losses) / len(losses))
        if rank == 0:
            print(f"stage {cfg.stage} epoch {epoch}: loss {epoch_losses[-1]:.4f}", flush=True)
            save_draft(model, out_dir, target.draft_dims, target.family, cfg)
    if world > 1:
        torch.distributed.barrier()
    return epoch_losses

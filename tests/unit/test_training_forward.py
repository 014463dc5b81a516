"""Training correctness, in seconds, on a tiny random target and a hand-made record (two images,
a prompt, a generated answer):

- the training forward equals the served draft's, as the independent reference draft
  (tests/vispec_reference.py, which the engine tests hold the plugin's proposals to) computes it
  from the checkpoint training writes: dropped rows, compressed rows, g on later rows; with and
  without the fc/img_fc biases, for several adaptor queries, for the EAGLE draft that drops
  image rows (written in the ViSpec layout with one query) and for the ViSpec draft that keeps
  them (its config.json says so);
- the served draft's own pieces (the validator's draft config, the row plan, `compress_image`,
  the row buffers and the draft body's forward after `fold_img_fc`) give every row the layer input
  training gives it, and drop the rows training drops, for ViSpec and both ablations;
- one stage-2 step trains the adaptor and the g half of img_fc; zeroing g, or the adaptor, changes
  the stage-2 loss;
- each ablation flag changes only what it names;
- checkpoints with and without the biases start a draft; a run takes exactly its steps.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import MethodType, SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from vispec_reference import ReferenceViSpecDraft

from vispec_vllm.checkpoint import load_checkpoint_description
from vispec_vllm.checkpoint_format import KEEP_IMAGE_ROWS_KEY
from vispec_vllm.draft_model import ViSpecDraftBody, ViSpecDraftModel
from vispec_vllm.proposer_state import CompressedImage, image_tables
from vispec_vllm.row_plan import ImageSpan, plan_rows
from vispec_vllm.target_checkpoint import TargetCheckpoint
from vispec_vllm.training import train
from vispec_vllm.training.data import write_shard
from vispec_vllm.training.train import (
    TrainConfig,
    build_training_draft,
    hold_adaptor_at_zero,
    record_loss,
    save_draft,
    train_draft,
)
from vispec_vllm.vision_adaptor import ViSpecVisionAdaptor

HIDDEN, HEADS, INTERMEDIATE, VOCAB = 32, 2, 64, 40
IMAGE_TOKEN = VOCAB - 1
# (offset, length) of the record's images; the answer starts at PROMPT_LENGTH of LENGTH tokens.
IMAGES = ((3, 6), (13, 4))
PROMPT_LENGTH, LENGTH = 19, 27


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> TargetCheckpoint:
    """A LLaVA-layout target directory holding only what a draft reads: config, embedding, lm_head."""
    directory = tmp_path_factory.mktemp("target")
    config = {"model_type": "llava", "image_token_index": IMAGE_TOKEN,
              "text_config": {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE,
                              "vocab_size": VOCAB}}
    (directory / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    save_file({"model.language_model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=generator),
               "model.vision_tower.embed_tokens.weight": torch.zeros(7, HIDDEN),  # not the language model's
               "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=generator)}, directory / "model.safetensors")
    return TargetCheckpoint.read(directory)


def make_record(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (LENGTH,), generator=generator)
    image_mask = torch.zeros(LENGTH, dtype=torch.uint8)
    for offset, length in IMAGES:
        ids[offset:offset + length] = IMAGE_TOKEN
        image_mask[offset:offset + length] = 1
    loss_mask = torch.zeros(LENGTH, dtype=torch.uint8)
    loss_mask[PROMPT_LENGTH:] = 1
    return {"input_ids": ids, "inputs_embeds": torch.randn(LENGTH, HIDDEN, generator=generator),
            "hidden_states": torch.randn(LENGTH, HIDDEN, generator=generator), "loss_mask": loss_mask,
            "image_mask": image_mask}


def image_rows() -> torch.Tensor:
    """Rows [o-1, o+L-1) of each image (docs/method.md §3.1)."""
    rows = torch.zeros(LENGTH - 1, dtype=torch.bool)
    for offset, length in IMAGES:
        rows[offset - 1:offset + length - 1] = True
    return rows


@torch.no_grad()
def randomise(model: torch.nn.Module, keep_img_fc: bool = False, seed: int = 2) -> None:
    """Every trainable weight random (img_fc's g half included, unless kept at its initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.startswith("embed_tokens.") or (keep_img_fc and name.startswith("img_fc.")):
            continue
        param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if name.endswith("norm.weight") else 0))


def reference_outputs(draft_dir: Path, target: TargetCheckpoint, record: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, outputs) of every row the reference draft builds over the whole record."""
    reference = ReferenceViSpecDraft(draft_dir, target.lm_head())
    seen = {}
    layer = reference.layer

    def capturing_layer(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        seen.setdefault("call", (positions, layer(rows, positions)))  # the first call: the prompt's rows
        return seen["call"][1]

    reference.layer = capturing_layer
    hidden, embeds = record["hidden_states"], record["inputs_embeds"]
    reference.propose(record["input_ids"].tolist(), dict(enumerate(hidden)),
                      [(offset, length, embeds[offset:offset + length]) for offset, length in IMAGES],
                      last_row=LENGTH - 2, k=1)
    return seen["call"]


@pytest.mark.parametrize(("num_q", "fc_bias"), [(2, False), (2, True), (3, False)])
def test_training_forward_equals_the_served_draft(target, tmp_path, num_q, fc_bias):
    cfg = TrainConfig(stage=2, num_q=num_q, fc_bias=fc_bias)
    model = build_training_draft(target, cfg)
    randomise(model)
    save_draft(model, tmp_path, target.draft_dims, target.family, cfg)
    record = make_record()
    with torch.no_grad():
        out, kept = model(record["hidden_states"], record, cfg.uses_vision, cfg.drops_image_rows)
    # Every image row but the last num_q - 1 of each image is dropped.
    assert int((~kept).sum()) == sum(length - (num_q - 1) for _, length in IMAGES)
    assert int((kept & image_rows()).sum()) == len(IMAGES) * (num_q - 1)  # the compressed rows
    positions, expected = reference_outputs(tmp_path, target, record)
    assert torch.equal(positions, torch.arange(LENGTH - 1)[kept])
    torch.testing.assert_close(out[kept], expected, rtol=1e-3, atol=1e-4)
    assert not out[~kept].any()
    assert KEEP_IMAGE_ROWS_KEY not in json.loads((tmp_path / "config.json").read_text())  # the published config


def test_eagle_draft_dropping_image_rows_is_served_as_a_one_query_vispec_draft(target, tmp_path):
    cfg = TrainConfig(stage=1, drop_image_rows=True)
    model = build_training_draft(target, cfg)
    randomise(model, keep_img_fc=True)  # stage 1 never trains img_fc: it stays [I | 0]
    save_draft(model, tmp_path, target.draft_dims, target.family, cfg)
    checkpoint = load_checkpoint_description(str(tmp_path))  # the validator serves it
    assert checkpoint.dims.num_q == 1 and not checkpoint.keep_image_rows
    record = make_record()
    with torch.no_grad():
        out, kept = model(record["hidden_states"], record, cfg.uses_vision, cfg.drops_image_rows)
    assert torch.equal(kept, ~image_rows())
    positions, expected = reference_outputs(tmp_path, target, record)
    assert torch.equal(positions, torch.arange(LENGTH - 1)[kept])
    torch.testing.assert_close(out[kept], expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("num_q", [2, 3])
def test_vispec_draft_keeping_image_rows_is_served_keeping_them(target, tmp_path, num_q):
    cfg = TrainConfig(stage=2, num_q=num_q, keep_image_rows=True)
    model = build_training_draft(target, cfg)
    randomise(model)
    save_draft(model, tmp_path, target.draft_dims, target.family, cfg)
    assert json.loads((tmp_path / "config.json").read_text())[KEEP_IMAGE_ROWS_KEY] is True
    checkpoint = load_checkpoint_description(str(tmp_path))
    assert checkpoint.keep_image_rows and checkpoint.dims.num_q == num_q
    record = make_record()
    with torch.no_grad():
        out, kept = model(record["hidden_states"], record, cfg.uses_vision, cfg.drops_image_rows)
    assert kept.all()
    positions, expected = reference_outputs(tmp_path, target, record)
    assert torch.equal(positions, torch.arange(LENGTH - 1))
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)


class LayerInput(nn.Module):
    """Stands in for the served layer 0: hands back its input rows and dropped flags."""

    def forward(self, positions, layer_input, is_dropped_row):
        return layer_input, is_dropped_row


class ServedBody(nn.Module):
    """`ViSpecDraftBody.forward` over plain torch layers holding the checkpoint's weights."""

    forward = ViSpecDraftBody.forward

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        has_bias = "fc.bias" in weights
        self.fc, self.img_fc = (nn.Linear(2 * HIDDEN, HIDDEN, bias=has_bias) for _ in range(2))
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        for name, module in (("fc", self.fc), ("img_fc", self.img_fc), ("embed_tokens", self.embed_tokens)):
            module.load_state_dict({key.removeprefix(f"{name}."): value for key, value in weights.items()
                                    if key.startswith(f"{name}.")})
        self.layers = nn.ModuleList([LayerInput()])


@torch.no_grad()
def served_first_pass(draft_dir: Path, record: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer input, dropped flag) of every row of the record as the served draft builds them in one
    prefill pass: the validator's draft config, the row plan, the adaptor's compressed state per
    image, the row buffers and the body's forward, as ViSpecProposer and ViSpecDraftModel run them."""
    vispec = load_checkpoint_description(str(draft_dir)).vispec_draft_config(None, adaptive_schedule=False)
    weights = load_file(draft_dir / "model.safetensors")
    rows = LENGTH - 1
    imadpt = ViSpecVisionAdaptor(HIDDEN, HEADS, HIDDEN // HEADS, vispec.num_q, qkv_bias=False)
    imadpt.load_state_dict({key.removeprefix("imadpt."): value for key, value in weights.items()
                            if key.startswith("imadpt.")})
    draft = SimpleNamespace(
        model=ServedBody(weights), hidden_size=HIDDEN, imadpt=imadpt, num_q=vispec.num_q,
        keep_image_rows=vispec.keep_image_rows, global_image_projection=torch.zeros(HIDDEN, HIDDEN),
        global_image_term=torch.zeros(rows, HIDDEN), compressed_token=torch.zeros(rows, HIDDEN),
        is_compressed_row=torch.zeros(rows, dtype=torch.bool), is_dropped_row=torch.zeros(rows, dtype=torch.bool),
        flagged_rows=0)
    for method in ("fold_img_fc", "compress_image", "set_planned_rows"):
        setattr(draft, method, MethodType(getattr(ViSpecDraftModel, method), draft))
    draft.fold_img_fc()
    images = [ImageSpan(offset, length) for offset, length in IMAGES]
    plan = plan_rows(images, draft.num_q, torch.tensor([0, rows]), torch.tensor([0]),
                     keep_image_rows=draft.keep_image_rows)
    compressed = [draft.compress_image(record["inputs_embeds"][i.offset:i.offset + i.length]) for i in images]
    assert all(tokens.shape == (vispec.num_q - 1, HIDDEN) for tokens, _ in compressed)
    global_image_terms, compressed_tokens = image_tables(
        [CompressedImage(tokens, term) for tokens, term in compressed], vispec.num_q - 1, HIDDEN, torch.float32,
        torch.device("cpu"))
    draft.set_planned_rows(global_image_terms, plan.global_feature_source % len(global_image_terms), compressed_tokens,
                           plan.compressed_index % len(compressed_tokens), plan.compressed_index >= 0, plan.is_dropped)
    (layer_input, dropped), _ = ViSpecDraftModel.forward(draft, record["input_ids"][1:], torch.arange(rows),
                                                         record["hidden_states"][:rows])
    return layer_input, dropped


@pytest.mark.parametrize("cfg", [
    pytest.param(TrainConfig(stage=2), id="vispec"),
    pytest.param(TrainConfig(stage=2, fc_bias=True, num_q=3), id="vispec-bias-q3"),
    pytest.param(TrainConfig(stage=2, keep_image_rows=True), id="vispec-keep"),
    pytest.param(TrainConfig(stage=1, drop_image_rows=True), id="eagle-drop"),
])
def test_served_rows_are_the_training_rows(target, tmp_path, cfg):
    model = build_training_draft(target, cfg)
    randomise(model, keep_img_fc=not cfg.uses_vision)  # stage 1 never trains img_fc: it stays [I | 0]
    save_draft(model, tmp_path, target.draft_dims, target.family, cfg)
    record = make_record()
    training_input, kept = row_inputs(model, cfg, record)
    served_input, dropped = served_first_pass(tmp_path, record)
    assert torch.equal(dropped, ~kept)
    # Equal up to the float32 rounding of the fold (docs/method.md §6.9).
    torch.testing.assert_close(served_input[kept], training_input[kept], rtol=1e-5, atol=1e-5)


def test_one_stage2_step_trains_the_adaptor_and_the_g_half_of_img_fc(target):
    cfg = TrainConfig(stage=2, lr=1e-3)
    model = build_training_draft(target, cfg)  # img_fc as stage 2 starts: [I | 0]
    g_half = model.img_fc.weight[:, HIDDEN:]
    assert not g_half.any()
    loss = record_loss(model, make_record(), cfg, target.lm_head(), torch.Generator().manual_seed(0))
    loss.backward()
    for name, param in model.imadpt.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.img_fc.weight.grad[:, HIDDEN:].abs().sum() > 0
    torch.optim.AdamW(model.parameters(), lr=cfg.lr).step()
    assert g_half.any()


def stage2_loss(model, cfg: TrainConfig, target: TargetCheckpoint) -> float:
    with torch.no_grad():
        return record_loss(model, make_record(), cfg, target.lm_head(), torch.Generator().manual_seed(0)).item()


def test_zeroing_g_or_the_adaptor_changes_the_stage2_loss(target):
    cfg = TrainConfig(stage=2)
    model = build_training_draft(target, cfg)
    randomise(model)
    loss = stage2_loss(model, cfg, target)
    assert stage2_loss(model, cfg, target) == loss  # deterministic

    def zero_g(_module, _inputs, adapted: torch.Tensor) -> torch.Tensor:
        return torch.cat([adapted[:-1], torch.zeros_like(adapted[-1:])])

    handle = model.imadpt.register_forward_hook(zero_g)
    without_g = stage2_loss(model, cfg, target)
    handle.remove()
    assert abs(without_g - loss) > 1e-4 * abs(loss)
    hold_adaptor_at_zero(model)
    without_adaptor = stage2_loss(model, cfg, target)
    assert abs(without_adaptor - loss) > 1e-4 * abs(loss)
    assert without_adaptor != without_g  # the compressed tokens count too


def states(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def row_inputs(model, cfg: TrainConfig, record) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.row_inputs(record["hidden_states"], record, cfg.uses_vision, cfg.drops_image_rows)


def test_zero_adaptor_holds_only_the_adaptor_output_at_zero(target):
    cfg = TrainConfig(stage=2)
    plain, ablated = build_training_draft(target, cfg), build_training_draft(target, replace(cfg, zero_adaptor=True))
    plain_state, ablated_state = states(plain), states(ablated)
    assert {n for n in plain_state if not torch.equal(plain_state[n], ablated_state[n])} == {"imadpt.o_proj.weight"}
    assert not ablated.imadpt(torch.randn(5, HIDDEN)).any()
    frozen = {n for n, p in ablated.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in plain.named_parameters() if not p.requires_grad} | {
        f"imadpt.{n}" for n, _ in ablated.imadpt.named_parameters()}
    # Rows the adaptor does not reach (before any image) are untouched.
    record = make_record()
    (plain_inputs, plain_kept), (ablated_inputs, ablated_kept) = (row_inputs(m, cfg, record) for m in (plain, ablated))
    assert torch.equal(plain_kept, ablated_kept)
    before_images = IMAGES[0][0] - 1
    torch.testing.assert_close(ablated_inputs[:before_images], plain_inputs[:before_images], rtol=0, atol=0)


def test_keep_image_rows_keeps_only_the_dropped_rows(target):
    cfg = TrainConfig(stage=2)
    plain = build_training_draft(target, cfg)
    kept_rows = build_training_draft(target, replace(cfg, keep_image_rows=True))
    randomise(plain)
    randomise(kept_rows)
    assert all(torch.equal(a, b) for a, b in zip(states(plain).values(), states(kept_rows).values(), strict=True))
    record = make_record()
    plain_inputs, plain_kept = row_inputs(plain, cfg, record)
    inputs, kept = row_inputs(kept_rows, replace(cfg, keep_image_rows=True), record)
    assert kept.all()
    assert (~plain_kept).any()
    torch.testing.assert_close(inputs[plain_kept], plain_inputs[plain_kept], rtol=0, atol=0)
    # The rows ViSpec drops become EAGLE rows that fuse no g.
    dropped = ~plain_kept
    hidden = record["hidden_states"][:-1][dropped]
    with torch.no_grad():
        eagle_rows = kept_rows.fc(torch.cat([kept_rows.embed_tokens(record["input_ids"][1:][dropped]),
                                             kept_rows.img_fc(torch.cat([hidden, torch.zeros_like(hidden)], -1))], -1))
    torch.testing.assert_close(inputs[dropped], eagle_rows, rtol=0, atol=0)


def test_drop_image_rows_drops_only_the_image_rows(target):
    cfg = TrainConfig(stage=1)
    plain = build_training_draft(target, cfg)
    dropping = build_training_draft(target, replace(cfg, drop_image_rows=True))
    plain_state, dropping_state = states(plain), states(dropping)
    # Only the adaptor differs (one query), which stage 1 never runs.
    assert {n for n in plain_state if n not in dropping_state or not torch.equal(plain_state[n], dropping_state[n])
            } == {n for n in plain_state if n.startswith("imadpt.")}
    record = make_record()
    plain_inputs, plain_kept = row_inputs(plain, cfg, record)
    inputs, kept = row_inputs(dropping, replace(cfg, drop_image_rows=True), record)
    assert plain_kept.all()
    assert torch.equal(kept, ~image_rows())
    torch.testing.assert_close(inputs, plain_inputs, rtol=0, atol=0)


def test_ablation_flags_belong_to_their_stage():
    for stage, flag in ((1, "zero_adaptor"), (1, "keep_image_rows"), (2, "drop_image_rows")):
        with pytest.raises(ValueError, match=flag):
            TrainConfig(stage=stage, **{flag: True})


def test_checkpoints_with_and_without_biases_start_a_draft(target, tmp_path):
    stage1 = TrainConfig(stage=1)
    unbiased = build_training_draft(target, stage1)
    randomise(unbiased)
    save_draft(unbiased, tmp_path / "unbiased", target.draft_dims, target.family, stage1)
    # Stage 2 with biases from a stage 1 without: the fc bias starts at zero, the rest as saved.
    biased = build_training_draft(target, TrainConfig(stage=2, fc_bias=True), init_dir=tmp_path / "unbiased")
    assert not biased.fc.bias.any() and not biased.img_fc.bias.any()
    assert torch.equal(biased.fc.weight, unbiased.fc.weight)
    save_draft(biased, tmp_path / "biased", target.draft_dims, target.family, TrainConfig(stage=2, fc_bias=True))
    again = build_training_draft(target, TrainConfig(stage=2, fc_bias=True), init_dir=tmp_path / "biased")
    assert all(torch.equal(a, b) for a, b in zip(states(biased).values(), states(again).values(), strict=True))
    with pytest.raises(ValueError, match="fc.bias"):
        build_training_draft(target, TrainConfig(stage=2), init_dir=tmp_path / "biased")


def test_a_stage1_draft_that_drops_image_rows_starts_stage2_with_its_eagle_part_only(target, tmp_path):
    dropping = TrainConfig(stage=1, drop_image_rows=True)
    first_half = build_training_draft(target, dropping)
    randomise(first_half)
    save_draft(first_half, tmp_path / "drop", target.draft_dims, target.family, dropping)
    stage2 = TrainConfig(stage=2)
    started = build_training_draft(target, stage2, init_dir=tmp_path / "drop")
    fresh = build_training_draft(target, stage2)
    assert started.imadpt.num_q == stage2.num_q != first_half.imadpt.num_q
    for name, value in states(started).items():
        source = fresh if name.startswith(("imadpt.", "img_fc.")) else first_half
        assert torch.equal(value, states(source)[name]), name


def test_a_run_takes_exactly_its_steps_on_the_schedule(target, tmp_path, monkeypatch):
    (tmp_path / "records").mkdir()
    write_shard(tmp_path / "records", 0, [make_record(seed) for seed in range(3)])
    calls = []
    monkeypatch.setattr(train, "record_loss", lambda *args: calls.append(1) or record_loss(*args))
    cfg = TrainConfig(stage=1, epochs=2, steps=5, lr=1e-3)
    losses = train_draft(target.directory, tmp_path / "records", tmp_path / "draft", cfg)
    assert len(calls) == 5 and len(losses) == 2  # one pass over 3 records, then 2 of the next
    assert json.loads((tmp_path / "draft" / "training_config.json").read_text())["steps"] == 5
    factors = [train.learning_rate_factor(step, 2, 5) for step in range(5)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3])

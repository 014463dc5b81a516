"""The draft training pipeline on tiny targets: data records line up for every family, both
stages lower their loss and write checkpoints that vLLM serves (ViSpec and plain EAGLE)
losslessly, the regime experiment's two ablations (the EAGLE draft that drops image rows, the
ViSpec draft that keeps them) serve losslessly and propose what the independent reference draft
proposes from their checkpoints, and the multi-process path runs under torchrun with 2 CPU
processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import chat_tokens, engine_metrics, make_llm, mixed_conversations, model_runner_of, shutdown_llm
from proposal_recorder import record_proposals
from safetensors.torch import load_file
from vispec_reference import ReferenceViSpecDraft, target_lm_head

from vispec_vllm.checkpoint import load_checkpoint_description
from vispec_vllm.target_checkpoint import TargetCheckpoint
from vispec_vllm.training.data import generate_training_data, load_records, prompts_from_conversations
from vispec_vllm.training.train import TrainConfig, train_draft

pytestmark = pytest.mark.engine

FAMILIES = ["tiny-llava", "tiny-llava-next", "tiny-qwen2_5_vl"]
MAX_TOKENS = 8


@pytest.mark.parametrize("name", FAMILIES)
def test_records_line_up(tiny_models, tmp_path, name):
    target = tiny_models / name
    conversations = mixed_conversations()[:4]  # image, image, text only, two images
    out = generate_training_data(target, tmp_path / "data", prompts_from_conversations(conversations),
                                 num_samples=4, max_tokens=MAX_TOKENS, shard_size=3)
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000.pt", "shard_00001.pt"]
    checkpoint = TargetCheckpoint.read(target)
    embed, lm_head = checkpoint.input_embedding(), checkpoint.lm_head()
    records = load_records(out)
    assert len(records) == 4
    for record, num_images in zip(records, (1, 1, 0, 2), strict=True):
        ids, mask = record["input_ids"], record["image_mask"].bool()
        assert torch.equal(mask, ids == checkpoint.image_token_id)
        assert (mask.sum() > 0) == (num_images > 0)
        text = ~mask
        assert torch.allclose(record["inputs_embeds"][text].float(), embed[ids[text]], atol=2e-3)
        if num_images:  # image rows hold image features, not the placeholder's embedding
            assert not torch.allclose(record["inputs_embeds"][mask].float(), embed[ids[mask]], atol=1e-2)
        generated = record["loss_mask"].bool()
        assert generated.sum() == MAX_TOKENS and generated[-MAX_TOKENS:].all()
        # h_i predicts x_{i+1}: the target's own greedy choice at every generated token.
        start = int(generated.nonzero()[0])
        predicted = (record["hidden_states"][start - 1:-1].float() @ lm_head.T).argmax(-1)
        assert torch.equal(predicted, ids[start:])


@pytest.fixture(scope="module")
def llava_data(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava-records")
    return generate_training_data(tiny_models / "tiny-llava", out, prompts_from_conversations(mixed_conversations()),
                                  num_samples=10, max_tokens=24, shard_size=5)


def test_both_stages_lower_loss_and_serve_losslessly(tiny_models, llava_data, tmp_path):
    target = tiny_models / "tiny-llava"
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    losses1 = train_draft(target, llava_data, stage1, TrainConfig(stage=1, epochs=3, lr=1e-3))
    losses2 = train_draft(target, llava_data, stage2, TrainConfig(stage=2, epochs=3, lr=1e-3), init_dir=stage1)
    assert losses1[-1] < losses1[0] and losses2[-1] < losses2[0]
    assert set(load_file(stage1 / "model.safetensors")) == {
        "embed_tokens.weight", "fc.weight", *(k for k in load_file(stage2 / "model.safetensors")
                                              if k.startswith("layers.0."))}
    assert load_checkpoint_description(str(stage2)).dims.num_q == 2  # the published ViSpec format

    baseline_llm = make_llm(target)
    baseline = chat_tokens(baseline_llm, mixed_conversations())
    shutdown_llm(baseline_llm)
    for draft, method, proposer in ((stage2, None, "ViSpecProposer"), (stage1, "eagle", "EagleProposer")):
        spec = {"model": str(draft), "num_speculative_tokens": 3, **({"method": method} if method else {})}
        llm = make_llm(target, speculative_config=spec, disable_log_stats=False)
        try:
            assert type(model_runner_of(llm).drafter).__name__ == proposer
            assert chat_tokens(llm, mixed_conversations()) == baseline
            # Trained on these very prompts, the drafts must now be accepted.
            assert engine_metrics(llm)["vllm:spec_decode_num_accepted_tokens"] > 0
        finally:
            shutdown_llm(llm)


@pytest.mark.usefixtures("fixed_number_of_draft_tokens")  # the reference drafts K tokens every step
def test_ablation_drafts_serve_as_trained(tiny_models, llava_data, tmp_path):
    target = tiny_models / "tiny-llava"
    # vispec_vllm/demo/build.py's eagle-drop and vispec-keep (stage 2 here from scratch), tiny:
    # (training config, the served draft's (num_q, keep_image_rows)).
    ablations = {
        "eagle-drop": (TrainConfig(stage=1, epochs=3, lr=1e-3, drop_image_rows=True), (1, False)),
        "vispec-keep": (TrainConfig(stage=2, epochs=3, lr=1e-3, keep_image_rows=True), (2, True)),
    }
    for name, (cfg, _) in ablations.items():
        train_draft(target, llava_data, tmp_path / name, cfg)
    baseline_llm = make_llm(target)
    baseline = chat_tokens(baseline_llm, mixed_conversations())
    shutdown_llm(baseline_llm)
    two_images = mixed_conversations()[3]
    for name, (_, served_as) in ablations.items():
        draft = tmp_path / name
        llm = make_llm(target, speculative_config={"model": str(draft), "num_speculative_tokens": 3})
        try:
            drafter = model_runner_of(llm).drafter
            assert type(drafter).__name__ == "ViSpecProposer"
            assert (drafter.draft.num_q, drafter.draft.keep_image_rows) == served_as, name
            assert chat_tokens(llm, mixed_conversations()) == baseline, name
            recorder, sequence = record_proposals(llm, two_images)
            assert len(recorder.images) == 2 and recorder.steps
            reference = ReferenceViSpecDraft(draft, target_lm_head(target))
            images = sorted(recorder.images.values(), key=lambda image: image[0])
            for step in recorder.steps:
                expected = reference.propose(sequence[: step.last_row + 2], recorder.target_hidden, images,
                                             step.last_row, 3)
                assert step.proposals == expected, f"{name}: step at row {step.last_row}"
        finally:
            shutdown_llm(llm)


def test_torchrun_two_cpu_processes(tiny_models, llava_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp-stage2"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "vispec_vllm.cli", "train", "stage2", "--target", str(tiny_models / "tiny-llava"),
         "--data", str(llava_data), "--out", str(out), "--epochs", "2", "--lr", "1e-3"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stage2: epoch losses" in result.stdout
    assert load_checkpoint_description(str(out)).dims.num_q == 2

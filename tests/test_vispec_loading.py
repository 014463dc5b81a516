"""Loading ViSpec drafts: both weight formats, num_q 2 and 5, a draft without embed_tokens, a draft
with tensors it does not use (ignored with a warning), drafts that do not fit the target or are
malformed or hold NaN (clear start-up errors), and plain EAGLE checkpoints run as EAGLE, with or
without a method."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from conftest import (
    chat_tokens,
    engine_metrics,
    greedy,
    make_image,
    make_llm,
    mixed_conversations,
    model_runner_of,
    shutdown_llm,
    text_part,
)
from proposal_recorder import record_proposals
from safetensors.torch import load_file, save_file
from vispec_reference import ReferenceViSpecDraft, target_lm_head

from vispec_vllm.checkpoint import ViSpecCheckpointError, load_checkpoint_description
from vispec_vllm.checkpoint_format import DraftDims
from vispec_vllm.factory.tiny_models import write_vispec_draft

K = 3
# Proposals are compared at a fixed K (load-adaptive speculation re-derives K as it measures).
pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]
PROMPT = [{"role": "user", "content": [{"type": "image_pil", "image_pil": make_image("cyan")},
                                       text_part("Describe the image in detail.")]}]


@pytest.fixture(scope="module")
def llava(tiny_models):
    target = tiny_models / "tiny-llava"
    baseline_llm = make_llm(target)
    baseline = chat_tokens(baseline_llm, mixed_conversations())
    shutdown_llm(baseline_llm)
    return target, tiny_models / "tiny-llava-vispec", baseline


def spec_run(target, draft, baseline, **spec_fields):
    """Build a ViSpec engine, check losslessness, return (proposal steps, sequence, draft module)."""
    llm = make_llm(target, speculative_config={"model": str(draft), "num_speculative_tokens": K, **spec_fields})
    try:
        assert chat_tokens(llm, mixed_conversations()) == baseline
        recorder, sequence = record_proposals(llm, PROMPT)
        drafter = model_runner_of(llm).drafter
        return recorder, sequence, drafter
    finally:
        shutdown_llm(llm)


def copy_draft(src, dst, transform=None, fmt: str = "safetensors"):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    weights = load_file(src / "model.safetensors")
    if transform:
        weights = transform(weights)
    if fmt == "safetensors":
        save_file(weights, dst / "model.safetensors")
    else:
        torch.save(weights, dst / "pytorch_model.bin")
    return dst


@pytest.fixture(scope="module")
def safetensors_run(llava):
    target, draft, baseline = llava
    recorder, sequence, _ = spec_run(target, draft, baseline)
    return recorder, sequence


def test_bin_checkpoint_drafts_like_safetensors(llava, safetensors_run, tmp_path):
    target, draft, baseline = llava
    bin_draft = copy_draft(draft, tmp_path / "bin-draft", fmt="bin")
    recorder, sequence, drafter = spec_run(target, bin_draft, baseline)
    assert type(drafter).__name__ == "ViSpecProposer"
    assert [s.proposals for s in recorder.steps] == [s.proposals for s in safetensors_run[0].steps]


class _Collect(logging.Handler):
    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_missing_embed_tokens_falls_back_to_target_with_warning(llava, safetensors_run, tmp_path):
    target, draft, baseline = llava
    no_embed = copy_draft(draft, tmp_path / "no-embed",
                          transform=lambda w: {k: v for k, v in w.items() if k != "embed_tokens.weight"})
    warnings = _Collect()
    logging.getLogger("vllm").addHandler(warnings)  # vLLM's loggers do not propagate to the root
    try:
        recorder, _, drafter = spec_run(target, no_embed, baseline)
    finally:
        logging.getLogger("vllm").removeHandler(warnings)
    assert any("no embed_tokens" in m and "target's input embedding" in m for m in warnings.messages)
    # The published embed_tokens is a copy of the target's, so drafts are unchanged.
    assert [s.proposals for s in recorder.steps] == [s.proposals for s in safetensors_run[0].steps]


def test_num_q_5_matches_reference(llava, tmp_path):
    target, draft, baseline = llava
    embed = load_file(draft / "model.safetensors")["embed_tokens.weight"]
    q5 = tmp_path / "q5"
    write_vispec_draft(q5, DraftDims(128, 4, 32, 256, 512, False), "llama", embed, seed=7, num_q=5)
    assert load_checkpoint_description(str(q5)).dims.num_q == 5
    recorder, sequence, _ = spec_run(target, q5, baseline)
    reference = ReferenceViSpecDraft(q5, target_lm_head(target))
    images = sorted(recorder.images.values(), key=lambda image: image[0])
    for step in recorder.steps:
        assert step.proposals == reference.propose(sequence[: step.last_row + 2], recorder.target_hidden, images,
                                                   step.last_row, K)


def test_extra_tensors_are_ignored_with_one_warning(llava, safetensors_run, tmp_path):
    target, draft, baseline = llava
    # A leftover lm_head (NaN: were it loaded, the draft would stop sharing the target's and propose
    # garbage) and a training buffer.
    extra = {"lm_head.weight": torch.full((512, 128), math.nan),
             "layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}
    with_extra = copy_draft(draft, tmp_path / "extra", transform=lambda w: {**w, **extra})
    warnings = _Collect()
    logging.getLogger("vllm").addHandler(warnings)  # vLLM's loggers do not propagate to the root
    try:
        recorder, _, drafter = spec_run(target, with_extra, baseline)
    finally:
        logging.getLogger("vllm").removeHandler(warnings)
    assert type(drafter).__name__ == "ViSpecProposer"
    ignored = [m for m in warnings.messages if "does not use" in m]
    assert len(ignored) == 1 and all(name in ignored[0] for name in extra), warnings.messages
    assert str(with_extra / "model.safetensors") in ignored[0]
    # The ignored tensors change nothing: the same drafts as the checkpoint without them.
    assert [s.proposals for s in recorder.steps] == [s.proposals for s in safetensors_run[0].steps]


@pytest.mark.parametrize("method", ["eagle", None], ids=["method-eagle", "no-method"])
def test_plain_eagle_checkpoint_runs_as_eagle(llava, tmp_path, method):
    target, draft, baseline = llava
    eagle_names = ("embed_tokens.", "layers.0.", "fc.weight")
    eagle = copy_draft(draft, tmp_path / "plain-eagle",
                       transform=lambda w: {k: v for k, v in w.items() if k.startswith(eagle_names)})
    spec = {"model": str(eagle), "num_speculative_tokens": K, **({"method": method} if method else {})}
    messages = _Collect(logging.INFO)
    logging.getLogger("vllm").addHandler(messages)
    try:
        llm = make_llm(target, speculative_config=spec, disable_log_stats=False)
    finally:
        logging.getLogger("vllm").removeHandler(messages)
    try:
        assert type(model_runner_of(llm).drafter).__name__ == "EagleProposer"
        assert type(model_runner_of(llm).drafter.model).__name__ == "EagleLlamaForCausalLM"
        assert chat_tokens(llm, mixed_conversations()) == baseline
        metrics = engine_metrics(llm)
        assert metrics["vllm:spec_decode_num_drafts"] > 0 and metrics["vllm:spec_decode_num_draft_tokens"] > 0
    finally:
        shutdown_llm(llm)
    routed = [m for m in messages.messages if "plain EAGLE draft" in m]
    # One line says so when the method was inferred; an explicit method is vLLM's own path.
    assert len(routed) == (1 if method is None else 0), messages.messages


@pytest.mark.parametrize("dims, family, message", [
    (DraftDims(64, 2, 32, 128, 512, False), "llama",
     r"draft hidden size 64 does not match the target's hidden size 128"),
    (DraftDims(128, 4, 32, 256, 1000, False), "llama",
     r"draft vocab size 1000 does not match the target's vocab size 512"),
    (DraftDims(128, 4, 32, 256, 512, True), "qwen2", r"a qwen2 ViSpec draft cannot serve a llama target"),
], ids=["hidden-size", "vocab", "family"])
def test_draft_that_does_not_fit_the_target_fails_at_startup(llava, tmp_path, dims, family, message):
    target, _, _ = llava
    draft = tmp_path / "mismatch"
    write_vispec_draft(draft, dims, family, torch.zeros(dims.vocab_size, dims.hidden_size), seed=1)
    with pytest.raises(Exception, match=message) as info:
        make_llm(target, speculative_config={"model": str(draft), "num_speculative_tokens": K})
    assert str(draft / "model.safetensors") in str(info.value)


def _malformed(kind: str):
    def transform(weights):
        weights = dict(weights)
        if kind == "missing":
            del weights["img_fc.bias"]
        elif kind == "nan":
            weights["layers.0.mlp.up_proj.weight"][5, 7] = math.nan
        elif kind == "num-q":
            weights["imadpt.q"] = torch.zeros(3, 4, 32)
            weights["imadpt.k_proj.weight"] = torch.zeros(96, 128)  # adaptor heads disagree with imadpt.q
        return weights
    return transform


@pytest.mark.parametrize("kind, message", [
    ("missing", r"missing weights: img_fc\.bias"),
    ("nan", r"NaN or Inf in draft weights: layers\.0\.mlp\.up_proj\.weight \(1 NaN\)"),
    ("num-q", r"wrong shapes: imadpt\.k_proj\.weight \[96, 128\] \(expected \[128, 128\]\)"),
    ("truncated", r"unreadable safetensors file"),
])
def test_malformed_checkpoint_fails_at_startup_naming_file_and_problem(llava, tmp_path, kind, message):
    target, draft, _ = llava
    bad = copy_draft(draft, tmp_path / kind, transform=None if kind == "truncated" else _malformed(kind))
    if kind == "truncated":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=message) as info:
        make_llm(target, speculative_config={"model": str(bad), "num_speculative_tokens": K})
    assert str(bad / "model.safetensors") in str(info.value)


def test_checkpoint_description_reads_num_q_from_weights(tiny_models):
    for name, family in (("tiny-llava-vispec", "llama"), ("tiny-qwen2_5_vl-vispec", "qwen2")):
        checkpoint = load_checkpoint_description(str(tiny_models / name))
        assert (checkpoint.dims.num_q, checkpoint.family) == (2, family)
        assert checkpoint.dims.qkv_bias == (family == "qwen2")
    config = json.loads((tiny_models / "tiny-llava-vispec" / "config.json").read_text())
    assert "num_q" not in config  # published configs do not carry it
    with pytest.raises(ViSpecCheckpointError, match="not a local directory"):
        load_checkpoint_description("/nonexistent/ViSpec-draft")


def test_prompt_longer_than_the_draft_supports_skips_speculation(llava):
    target, draft, baseline = llava
    # A draft limited to 48 positions: vLLM skips drafting while a sequence is longer; no error.
    llm = make_llm(target, speculative_config={"model": str(draft), "num_speculative_tokens": K,
                                               "max_model_len": 48}, disable_log_stats=False)
    try:
        outputs = llm.chat(mixed_conversations(), greedy())
        assert max(len(o.prompt_token_ids) for o in outputs) > 48
        assert [list(o.outputs[0].token_ids) for o in outputs] == baseline
    finally:
        shutdown_llm(llm)

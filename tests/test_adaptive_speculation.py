"""Load-adaptive speculation (default on for ViSpec): draft tokens per step shrink as more
requests run and stop past 32 (patches/speculative_config.py), outputs unchanged; an environment
switch turns it off."""

from __future__ import annotations

import pytest
from conftest import chat_tokens, engine_metrics, make_llm, mixed_conversations, shutdown_llm

K = 3
MANY = mixed_conversations() * 8  # 40 requests at once


def drafted(llm, conversations) -> tuple[float, float, list[list[int]]]:
    before = engine_metrics(llm)
    outputs = chat_tokens(llm, conversations)
    after = engine_metrics(llm)
    steps = after["vllm:spec_decode_num_drafts"] - before["vllm:spec_decode_num_drafts"]
    tokens = after["vllm:spec_decode_num_draft_tokens"] - before["vllm:spec_decode_num_draft_tokens"]
    return steps, tokens, outputs


@pytest.fixture(scope="module")
def baseline(tiny_models) -> list[list[int]]:
    llm = make_llm(tiny_models / "tiny-llava", max_num_seqs=40)
    outputs = chat_tokens(llm, MANY)
    shutdown_llm(llm)
    return outputs


def vispec_llm(tiny_models):
    return make_llm(tiny_models / "tiny-llava", max_num_seqs=40, disable_log_stats=False,
                    speculative_config={"model": str(tiny_models / "tiny-llava-vispec"), "num_speculative_tokens": K})


def test_draft_tokens_shrink_with_load(tiny_models, baseline):
    llm = vispec_llm(tiny_models)
    try:
        steps, tokens, outputs = drafted(llm, MANY)  # 40 running: past 32, no drafting
        assert (steps, tokens) == (0, 0)
        assert outputs == baseline
        steps, tokens, _ = drafted(llm, MANY[:12])  # 9..16 running: K-1 tokens per draft
        assert steps > 0 and tokens == steps * (K - 1)
        steps, tokens, outputs = drafted(llm, MANY[:1])  # alone: all K
        assert steps > 0 and tokens == steps * K
        assert outputs == baseline[:1]
    finally:
        shutdown_llm(llm)


def test_adaptive_speculation_can_be_turned_off(tiny_models, baseline, monkeypatch):
    monkeypatch.setenv("VISPEC_VLLM_ADAPTIVE", "0")
    llm = vispec_llm(tiny_models)
    try:
        steps, tokens, outputs = drafted(llm, MANY)
        assert steps > 0 and tokens == steps * K
        assert outputs == baseline
    finally:
        shutdown_llm(llm)

"""`vispec_vllm.demo.run.mean_acceptance_length` reads vLLM's Prometheus text: 1 + accepted / drafts,
summed over engines, ignoring the per-position, draft-token and `_created` series."""

from __future__ import annotations

import prometheus_client
import pytest

from vispec_vllm.demo.run import mean_acceptance_length

# What a two-engine vLLM server exposes (format of prometheus_client 0.x, labels as vLLM sets them).
TWO_ENGINES = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="scene llava"} 30.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="scene llava"} 10.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="scene llava"} 1.7e+09
vllm:spec_decode_num_drafts_created{engine="1",model_name="scene llava"} 1.7e+09
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="scene llava"} 90.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="scene llava"} 30.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="scene llava"} 45.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="scene llava"} 25.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="scene llava",position="0"} 25.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="scene llava",position="1"} 20.0
"""


def test_two_engines_are_summed_and_other_series_ignored():
    # (45 + 25) accepted over (30 + 10) drafts.
    assert mean_acceptance_length(TWO_ENGINES) == pytest.approx(1 + 70 / 40)


def test_no_drafts_gives_none():
    assert mean_acceptance_length("") is None
    assert mean_acceptance_length("# HELP vllm:num_requests_running x\nvllm:num_requests_running 3.0\n") is None
    zero = TWO_ENGINES.replace("} 30.0", "} 0.0").replace("} 10.0", "} 0.0")
    assert mean_acceptance_length(zero) is None


def test_drafts_without_acceptance_give_one():
    text = 'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 12.0\n'
    assert mean_acceptance_length(text) == 1.0


def test_text_written_by_prometheus_client():
    # The library vLLM exports with, on counters named as vLLM names them.
    registry = prometheus_client.CollectorRegistry()
    labels = ["model_name", "engine"]
    drafts = prometheus_client.Counter("vllm:spec_decode_num_drafts", "drafts", labels, registry=registry)
    accepted = prometheus_client.Counter("vllm:spec_decode_num_accepted_tokens", "accepted", labels, registry=registry)
    per_pos = prometheus_client.Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "per position",
                                        [*labels, "position"], registry=registry)
    drafts.labels("m", "0").inc(8)
    accepted.labels("m", "0").inc(6)
    per_pos.labels("m", "0", "0").inc(5)
    per_pos.labels("m", "0", "1").inc(1)
    text = prometheus_client.generate_latest(registry).decode()
    assert "vllm:spec_decode_num_drafts_total" in text  # the suffix vLLM's counters get on export
    assert mean_acceptance_length(text) == pytest.approx(1 + 6 / 8)

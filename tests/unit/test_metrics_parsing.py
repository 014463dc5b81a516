"""The one parser of vLLM's Prometheus text (`vispec_vllm.demo.server.metric_samples` /
`metric_total`, used by the demo, the benchmarks and the server tests), and the demo's
`mean_acceptance_length` on top of it: 1 + accepted / drafts, summed over engines, ignoring the
per-position, draft-token and `_created` series."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vispec_vllm.demo.run import mean_acceptance_length
from vispec_vllm.demo.server import metric_samples, metric_total

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


def test_samples_keep_their_labels_and_match_the_exact_name():
    assert metric_samples(TWO_ENGINES, "vllm:spec_decode_num_drafts_total") == [
        ({"engine": "0", "model_name": "scene llava"}, 30.0), ({"engine": "1", "model_name": "scene llava"}, 10.0)]
    # A name matches only itself, not the longer names that start with it.
    assert metric_samples(TWO_ENGINES, "vllm:spec_decode_num_draft") == []
    assert metric_total(TWO_ENGINES, "vllm:spec_decode_num_accepted_tokens_per_pos_total") == 45.0
    assert metric_total(TWO_ENGINES, "vllm:spec_decode_num_drafts_created") == pytest.approx(3.4e9)


def test_totals_filter_by_labels_and_are_zero_when_absent():
    assert metric_total(TWO_ENGINES, "vllm:spec_decode_num_drafts_total", engine="1") == 10.0
    assert metric_total(TWO_ENGINES, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position="1") == 20.0
    assert metric_total(TWO_ENGINES, "vllm:spec_decode_num_drafts_total", engine="2") == 0.0
    assert metric_total(TWO_ENGINES, "vllm:num_requests_running") == 0.0
    assert metric_total("vllm:num_requests_running 3.0\n", "vllm:num_requests_running") == 3.0  # no labels


def test_label_values_with_escapes_braces_and_timestamps():
    text = ('vispec:x_total{model_name="a \\"quoted\\" {name}",prompt="image"} 2.0 1700000000000\n'
            'vispec:x_total{model_name="back\\\\slash",prompt="text"} 5e+00\n')
    assert metric_samples(text, "vispec:x_total") == [
        ({"model_name": 'a "quoted" {name}', "prompt": "image"}, 2.0),
        ({"model_name": "back\\slash", "prompt": "text"}, 5.0)]
    assert metric_total(text, "vispec:x_total", prompt="text") == 5.0


def test_agrees_with_prometheus_clients_own_parser():
    # Every sample of a page written by the library vLLM exports with: counters with and without
    # labels, a gauge, and a histogram's buckets, sum and count.
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("vispec:spec_decode_num_drafts", "d", ["prompt"], registry=registry)
    counter.labels("image").inc(7)
    counter.labels("text").inc(2)
    prometheus_client.Counter("vispec:image_state_misses", "m", registry=registry).inc(3)
    prometheus_client.Gauge("vllm:num_requests_running", "r", ["engine"], registry=registry).labels("0").set(4)
    histogram = prometheus_client.Histogram("vllm:time_to_first_token_seconds", "t", ["engine"], registry=registry,
                                            buckets=[0.1, 1.0])
    histogram.labels("0").observe(0.5)
    text = prometheus_client.generate_latest(registry).decode()
    expected = [(sample.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(text) for sample in family.samples]
    assert len(expected) > 10
    for name in {name for name, _, _ in expected}:
        assert metric_samples(text, name) == [(labels, value) for n, labels, value in expected if n == name], name

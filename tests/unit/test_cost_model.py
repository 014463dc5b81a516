"""The cost model (vispec_vllm/cost_model.py): model shapes against the reference's parameter
counts, the structure of a speculative step, the acceptance curve, the schedule the plugin
derives from it, and the shipped constants against a refit to the committed measurements."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vispec_vllm import speculation_schedule
from vispec_vllm.cost_model import (
    H100,
    H200,
    THIS_CPU,
    AcceptanceCurve,
    derive_schedule,
    draft_forward_time,
    step_time,
    target_forward_time,
    tokens_per_second,
)
from vispec_vllm.speculation_schedule import DEFAULT_ACCEPTANCE_RATE, AdaptiveSchedule

# The benchmarks' modules: the catalogue of real targets (target_shapes) and the fit (cost_model).
BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from target_shapes import QWEN2_5_3B, QWEN2_5_7B, VICUNA_7B, VICUNA_13B  # noqa: E402


@pytest.mark.parametrize(("shape", "draft_layer_millions", "total_billions"), [
    (VICUNA_7B, 202.4, 6.74), (VICUNA_13B, 317.2, 13.0), (QWEN2_5_3B, 84.4, 3.09), (QWEN2_5_7B, 255.1, 7.62)])
def test_shapes_match_the_reference_parameter_counts(shape, draft_layer_millions, total_billions):
    # docs/method.md §4.4 (the draft's layer 0, MHA even for Qwen; the targets' language models).
    assert round(shape.draft_layer().layer_params() / 1e6, 1) == draft_layer_millions
    embedding = 0 if shape.tie_word_embeddings else shape.hidden_size * shape.vocab_size
    assert (shape.decoder_params() + embedding) / 1e9 == pytest.approx(total_billions, rel=0.01)


def test_a_speculative_step_is_verify_plus_the_draft_chain():
    batch, context, k = 8, 1024, 3
    plain = step_time(H100, VICUNA_7B, batch, 0, context)
    assert plain == pytest.approx(H100.step_overhead_s + target_forward_time(H100, VICUNA_7B, batch, 1, context))
    speculative = step_time(H100, VICUNA_7B, batch, k, context)
    expected = (H100.step_overhead_s + target_forward_time(H100, VICUNA_7B, batch, k + 1, context)
                + draft_forward_time(H100, VICUNA_7B, batch, k + 1, context)
                + (k - 1) * draft_forward_time(H100, VICUNA_7B, batch, 1, context)
                + k * H100.draft_forward_overhead_s)
    assert speculative == pytest.approx(expected)
    # ViSpec's img_fc makes its draft forward dearer than plain EAGLE's, by one 2H x H matrix.
    assert draft_forward_time(H100, VICUNA_7B, 1, 1, context) > draft_forward_time(H100, VICUNA_7B, 1, 1, context,
                                                                                    vispec=False)
    acceptance = AcceptanceCurve.geometric(0.8)
    assert tokens_per_second(H100, VICUNA_7B, batch, 0, acceptance, context) == pytest.approx(batch / plain)
    assert tokens_per_second(H100, VICUNA_7B, batch, k, acceptance, context) == pytest.approx(
        batch * acceptance(k) / speculative)
    # More bandwidth, same compute: the H200 is faster at batch 1 (weight streaming).
    assert step_time(H200, VICUNA_7B, 1, 0, context) < plain


def test_acceptance_curve():
    geometric = AcceptanceCurve.geometric(0.5, max_k=4)
    assert [geometric(k) for k in range(5)] == [1.0, 1.5, 1.75, 1.875, 1.9375]
    measured = AcceptanceCurve({1: 1.9, 2: 2.7, 3: 3.4})
    assert measured(0) == 1.0 and measured(3) == 3.4
    gains = [measured(k + 1) - measured(k) for k in range(3, 8)]
    assert all(0 < later <= earlier for earlier, later in zip(gains, gains[1:], strict=False))
    with pytest.raises(ValueError, match="K = 1..n"):
        AcceptanceCurve({1: 1.9, 3: 3.0})
    # Nothing accepted (at some or every measured position): no gain beyond.
    assert AcceptanceCurve({1: 1.0})(3) == 1.0
    assert AcceptanceCurve({1: 1.5, 2: 1.5})(4) == 1.5
    assert AcceptanceCurve({1: 1.0, 2: 1.0})(3) == 1.0


@pytest.mark.parametrize("hardware", [H100, H200])
def test_schedule_shrinks_with_the_batch_and_stops(hardware):
    # Qwen2.5-VL-7B (GQA): past ~50 requests verifying K+1 tokens each makes the target compute-bound.
    schedule = derive_schedule(hardware, QWEN2_5_7B, 3, AcceptanceCurve.geometric(0.6), context=1024)
    assert schedule[0][:1] == (1,) and schedule[0][2] == 3
    assert schedule[-1][1:] == (1_000_000, 0)
    for (_, last, k), (first, _, next_k) in zip(schedule, schedule[1:], strict=False):
        assert first == last + 1 and next_k < k
    # Each range's K is the best one at its ends.
    for first, last, k in schedule[:-1]:
        for batch in (first, last):
            rates = [tokens_per_second(hardware, QWEN2_5_7B, batch, j, AcceptanceCurve.geometric(0.6), 1024)
                     for j in range(4)]
            assert rates[k] == max(rates)


def test_a_kv_bound_target_keeps_drafting():
    # LLaVA's Vicuna (MHA): at a large batch each step reads more KV than weights, and the KV is
    # read once however many tokens are verified, so drafting still pays at 1,024 requests.
    schedule = derive_schedule(H100, VICUNA_7B, 3, AcceptanceCurve.geometric(0.75), context=1024)
    assert schedule == [(1, 1_000_000, 3)]


def test_a_better_draft_keeps_drafting_to_larger_batches():
    def last_drafting_batch(rate):
        schedule = derive_schedule(H100, QWEN2_5_7B, 3, AcceptanceCurve.geometric(rate), context=1024)
        return max(last for _, last, k in schedule if k > 0)

    assert last_drafting_batch(0.9) > last_drafting_batch(0.6) > last_drafting_batch(0.3)


def test_the_start_up_schedule_is_the_cost_model_s(monkeypatch):
    text_config = SimpleNamespace(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                  num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
                                  vocab_size=32064)
    adaptive = AdaptiveSchedule.for_target(3, text_config, max_model_len=4096, max_num_seqs=256, hardware=H100)
    # Vicuna-7B's numbers (the name plays no part), at half the model length, up to max_num_seqs.
    expected = derive_schedule(H100, VICUNA_7B, 3, AcceptanceCurve.geometric(DEFAULT_ACCEPTANCE_RATE, max_k=3),
                               context=2048, max_batch=256)
    assert adaptive.initial() == expected == adaptive.schedule
    monkeypatch.setenv("VISPEC_VLLM_ACCEPTANCE_RATE", "0.3")
    assert adaptive.initial() != expected
    monkeypatch.setenv("VISPEC_VLLM_ACCEPTANCE_RATE", "1.5")
    with pytest.raises(ValueError, match="VISPEC_VLLM_ACCEPTANCE_RATE"):
        adaptive.initial()


def test_measured_acceptance_replaces_the_assumed_one(monkeypatch):
    monkeypatch.setattr(speculation_schedule, "MIN_REDERIVE_INTERVAL_S", 0.0)
    useless = AdaptiveSchedule(H100, VICUNA_7B, 3, context=1024, max_batch=256)
    results = [useless.record(3, 0) for _ in range(speculation_schedule.REDERIVE_EVERY)]
    assert results[:-1] == [None] * (len(results) - 1)
    # Nothing accepted: stop drafting, except for a request running alone (to keep measuring).
    assert results[-1] == useless.schedule == [(1, 1, 1), (2, 1_000_000, 0)]
    assert useless.derived_from(3) == 1.0

    perfect = AdaptiveSchedule(H100, VICUNA_7B, 3, context=1024, max_batch=256)
    for _ in range(speculation_schedule.REDERIVE_EVERY):
        schedule = perfect.record(3, 3)
    assert [perfect.derived_from(k) for k in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert schedule[0][2] == 3 and schedule[-1][2] == 3  # verifying 4 tokens of 256 requests still pays

    # Old drafts fade: counts halve once the first position has seen MEMORY_DRAFTS drafts.
    for _ in range(speculation_schedule.MEMORY_DRAFTS):
        perfect.record(1, 0)
    assert perfect.drafted[0] <= speculation_schedule.MEMORY_DRAFTS
    assert perfect.derived_from(1) < 1.6


def test_shipped_constants_are_the_refit_to_committed_measurements():
    import json

    import cost_model as benchmark

    from vispec_vllm.demo.models import DEMO_TARGET

    _, h100_rows = benchmark.load_step_times(benchmark.RESULTS / "step_times_h100.json")
    assert not benchmark.constants_agree(benchmark.fit_gpu(h100_rows, H100), H100,
                                         ("bandwidth_efficiency", "compute_efficiency", "layer_overhead_s"), 1e-6)
    serve = json.loads((benchmark.RESULTS / "serve_concurrency.json").read_text())
    fitted = benchmark.fit_cpu(serve["runs"], benchmark.demo_target_shape(DEMO_TARGET), 3, benchmark.DEMO_CONTEXT)
    assert not benchmark.constants_agree(fitted, THIS_CPU, benchmark.CPU_FITTED_FIELDS, 0.02)

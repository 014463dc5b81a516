"""Sampling at temperature 1 with speculation draws from the target's own distribution.

Greedy outputs cannot show a broken rejection sampler: they are exact with any draft. Sampled
outputs can. On a held-out scene each demo pair's target (the 36-token pair and the deep default
pair) is sampled at T=1, 200 times without speculation and 200 times with it (K=3; other seeds,
so the two samples are independent), and the first NUM_POSITIONS output tokens are compared:
position 1 comes from the prefill step, the later ones from verify steps, i.e. through the
rejection sampler.

The test, per draft: a chi-square test of homogeneity between the two samples, once for each
output position p = 1..NUM_POSITIONS (the token at p) and once for the whole prefix of
NUM_POSITIONS tokens (so a token that is plausible at its position but not after the tokens
before it counts too). Categories are the tokens (prefixes) drawn; those drawn fewer than
2 * MIN_EXPECTED times over both samples (an expected count under MIN_EXPECTED in each, with equal
sample sizes) are pooled into one category, and a pool still that small joins the rarest
category. X^2 = sum over cells of (observed - expected)^2 / expected, compared with the chi-square
distribution with (categories - 1) degrees of freedom: p-value = Q(df / 2, X^2 / 2), the
regularised upper incomplete gamma function. Each of the NUM_POSITIONS + 1 tests rejects at
FALSE_ALARM_RATE / (NUM_POSITIONS + 1) (Bonferroni), so a lossless sampler fails a draft's test
with probability at most FALSE_ALARM_RATE (up to the chi-square approximation, which the pooling
keeps valid). The seeds are fixed, so a given build passes or fails deterministically.

What it catches: vLLM 0.32.0's CPU expand kernel (fixed in patches/cpu_sampling_fallbacks.py)
left the temperature of every verified position uninitialised: 74 of 200 requests then drew a
second token the target never draws after its first, with ViSpec at K=3. Checked for ViSpec and
for plain EAGLE.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

import pytest
import torch
from conftest import engine_metrics, make_llm, shutdown_llm

from vispec_vllm.demo.models import DEMO_PAIRS
from vispec_vllm.demo.prompts import scene_prompts
from vispec_vllm.demo.target import RECIPES

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]

NUM_SAMPLES = 200
NUM_POSITIONS = 5  # the prefill's token, then K=3 drafts and the bonus token of the first verify step
MIN_EXPECTED = 5
FALSE_ALARM_RATE = 1e-3  # per draft, over its NUM_POSITIONS + 1 tests
TARGET_SEEDS = range(NUM_SAMPLES)
SPECULATIVE_SEEDS = range(10_000, 10_000 + NUM_SAMPLES)


def homogeneity_p_value(first: list[Hashable], second: list[Hashable]) -> tuple[float, int]:
    """Chi-square test that two equal-sized samples come from one distribution: (p-value, degrees of freedom)."""
    assert len(first) == len(second)
    counts = [Counter(first), Counter(second)]
    totals = counts[0] + counts[1]
    common = [category for category, total in totals.items() if total >= 2 * MIN_EXPECTED]
    pooled = [category for category in totals if category not in common]
    cells = [[sample[category] for category in common] for sample in counts]
    if pooled:
        pooled_counts = [sum(sample[category] for category in pooled) for sample in counts]
        if sum(pooled_counts) >= 2 * MIN_EXPECTED or not common:
            cells = [row + [extra] for row, extra in zip(cells, pooled_counts, strict=True)]
        else:  # too rare even together: merged into the rarest category
            rarest = min(range(len(common)), key=lambda i: cells[0][i] + cells[1][i])
            for row, extra in zip(cells, pooled_counts, strict=True):
                row[rarest] += extra
    observed = torch.tensor(cells, dtype=torch.float64)
    degrees_of_freedom = observed.shape[1] - 1
    if degrees_of_freedom == 0:
        return 1.0, 0
    expected = observed.sum(0, keepdim=True) / 2  # equal sample sizes: half of each category per sample
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(degrees_of_freedom / 2, dtype=torch.float64),
                                         statistic / 2)), degrees_of_freedom


def first_tokens(llm, prompt, seeds: range) -> list[tuple[int, ...]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=1.0, max_tokens=NUM_POSITIONS, ignore_eos=True, seed=seed) for seed in seeds]
    outputs = llm.chat([prompt] * len(params), params, use_tqdm=False)
    return [tuple(output.outputs[0].token_ids) for output in outputs]


# Image tokens per image of each demo pair the test samples (the 36-token pair and the deep default).
PAIRS = sorted(DEMO_PAIRS)
# Distinct first tokens the target draws at T=1, less one (measured: the deep target's first token
# takes two values; its 5-token prefixes more).
MIN_FIRST_TOKEN_DEGREES_OF_FREEDOM = {36: 2, 576: 1}


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{tokens}-image-tokens" for tokens in PAIRS])
def image_tokens(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def prompt(image_tokens):
    return scene_prompts(held_out=True, scenes=RECIPES[image_tokens].scenes)(0)


@pytest.fixture(scope="module")
def target_samples(image_tokens, prompt) -> list[tuple[int, ...]]:
    llm = make_llm(DEMO_PAIRS[image_tokens][0], limit_mm_per_prompt={"image": 1}, max_num_seqs=64)
    try:
        return first_tokens(llm, prompt, TARGET_SEEDS)
    finally:
        shutdown_llm(llm)


def test_the_homogeneity_test_separates_distributions():
    # The statistic on known inputs: one sample, reordered, is homogeneous with itself; a sample
    # whose second category moved to a third is not; a single category has nothing to test.
    sample = ["a"] * 120 + ["b"] * 80
    assert homogeneity_p_value(sample, sample[::-1]) == (1.0, 1)
    p_value, degrees_of_freedom = homogeneity_p_value(sample, ["a"] * 120 + ["b"] * 40 + ["c"] * 40)
    assert degrees_of_freedom == 2 and p_value < 1e-9
    # 2 x 2 table [[60, 40], [40, 60]]: X^2 = 8, df = 1, p = 0.00468 (chi-square tables)
    assert homogeneity_p_value(["a"] * 60 + ["b"] * 40, ["a"] * 40 + ["b"] * 60)[0] == pytest.approx(0.004678, abs=1e-6)
    assert homogeneity_p_value(["a"] * 200, ["a"] * 200) == (1.0, 0)


def test_the_target_alone_samples(image_tokens, target_samples):
    # The premise: at T=1 the target draws several first tokens and several prefixes, so there is a
    # distribution to compare.
    first_token_df = homogeneity_p_value([tokens[0] for tokens in target_samples],
                                         [tokens[0] for tokens in target_samples])[1]
    prefix_df = homogeneity_p_value(target_samples, target_samples)[1]
    assert first_token_df >= MIN_FIRST_TOKEN_DEGREES_OF_FREEDOM[image_tokens] and prefix_df >= 2
    assert all(len(tokens) == NUM_POSITIONS for tokens in target_samples)


@pytest.mark.parametrize("draft", ["vispec", "eagle"])
def test_sampled_tokens_with_speculation_follow_the_target_s_distribution(draft, image_tokens, prompt, target_samples):
    target, drafts = DEMO_PAIRS[image_tokens]
    speculative_config = {"model": str(drafts[draft]), "num_speculative_tokens": 3}
    if draft == "eagle":
        speculative_config["method"] = "eagle"
    llm = make_llm(target, limit_mm_per_prompt={"image": 1}, max_num_seqs=64, disable_log_stats=False,
                   speculative_config=speculative_config)
    try:
        samples = first_tokens(llm, prompt, SPECULATIVE_SEEDS)
        metrics = engine_metrics(llm)
    finally:
        shutdown_llm(llm)

    per_test_rate = FALSE_ALARM_RATE / (NUM_POSITIONS + 1)
    tests = {f"position {p + 1}": ([t[p] for t in target_samples], [t[p] for t in samples])
             for p in range(NUM_POSITIONS)}
    tests[f"first {NUM_POSITIONS} tokens"] = (target_samples, samples)
    results = {name: homogeneity_p_value(*pair) for name, pair in tests.items()}
    rejected = {name: result for name, result in results.items() if result[0] < per_test_rate}
    assert not rejected, (rejected, Counter(samples).most_common(8), Counter(target_samples).most_common(8))

    # Drafts are verified, and some are accepted at T=1 (a sampler that rejects everything is lossless too).
    assert metrics["vllm:spec_decode_num_drafts"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0

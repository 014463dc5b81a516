"""The shipped demo pairs (vispec_vllm/demo/models), at 36 and at 576 image tokens per image:
speculation is lossless on held-out prompts (one image, and on the 576 pair two images), the
trained ViSpec draft is accepted at the rate measured for it, and above the same draft with its
vision adaptor's output held at zero (same weights otherwise: what the adaptor contributes), on the
same prompts; the 576 target (scene-llava-deep-grown) describes held-out
scenes as well as measured."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import chat_tokens, engine_metrics, make_llm, shutdown_llm

from vispec_vllm.demo.models import DEMO_PAIRS
from vispec_vllm.demo.prompts import with_images
from vispec_vllm.demo.run import held_out_prompts
from vispec_vllm.demo.target import RECIPES

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("fixed_number_of_draft_tokens")]  # K on every step


@dataclass(frozen=True)
class PairCase:
    image_tokens: int
    num_prompts: int
    max_tokens: int
    k: int
    # The runs are deterministic (float32, greedy, fixed K); each floor sits just below the measured
    # value, so that a drafting change that costs acceptance fails here.
    min_mean_acceptance_length: float


CASES = {
    # Measured 1 + 366 accepted / 136 drafts = 3.69 (positions 1..3: 133, 122, 111 accepted); with the
    # adaptor zeroed 3.35.
    36: PairCase(36, num_prompts=8, max_tokens=128, k=3, min_mean_acceptance_length=3.65),
    # scene-llava-deep-grown: measured 5.06 on 4 descriptions and a comparison of held-out layouts
    # (ViSpec with its adaptor zeroed 4.98; on scene-llava-deep, the default target before, 4.75).
    576: PairCase(576, num_prompts=5, max_tokens=192, k=5, min_mean_acceptance_length=5.00),
}
# Measured 24 of 25 objects placed and 20 of 25 fully right; each floor allows one object fewer.
MIN_PLACED_RATE_576 = 0.92
MIN_FULLY_RIGHT_RATE_576 = 0.76


@dataclass
class PairRun:
    case: PairCase
    scenes: list[list]  # the scenes each prompt shows
    prompts: list[list[dict]]
    baseline: list[list[int]]
    drafts: dict  # draft name -> directory
    results: dict  # draft name -> (outputs, mean acceptance length)


def with_adaptor_zeroed(draft: Path, out: Path) -> Path:
    """A copy of `draft` whose adaptor output projection is zero: every compressed token and every
    global image feature is then zero, and nothing else changes."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(draft, out)
    (weights_file,) = out.glob("*.safetensors")
    weights = load_file(weights_file)
    assert weights["imadpt.o_proj.weight"].any()
    weights["imadpt.o_proj.weight"].zero_()
    save_file(weights, weights_file, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda n: f"{n}-image-tokens")
def pair(request, tmp_path_factory) -> PairRun:
    case = CASES[request.param]
    # Held-out prompts as the demo asks them: descriptions and, on rich scenes, one comparison.
    examples = held_out_prompts(RECIPES[case.image_tokens], case.num_prompts)
    prompts = [with_images(messages, [scene.image for scene in scenes_]) for scenes_, messages in examples]
    target, drafts = DEMO_PAIRS[case.image_tokens]
    llm = make_llm(target, limit_mm_per_prompt={"image": 2}, max_model_len=2048)
    baseline = chat_tokens(llm, prompts, case.max_tokens, ignore_eos=False)
    shutdown_llm(llm)
    zeroed = with_adaptor_zeroed(drafts["vispec"], tmp_path_factory.mktemp("drafts") / "vispec-adaptor-zeroed")
    return PairRun(case, [scenes_ for scenes_, _ in examples], prompts, baseline,
                   {"vispec": drafts["vispec"], "vispec-adaptor-zeroed": zeroed}, {})


def speculate(run: PairRun, name: str) -> tuple[list[list[int]], float]:
    """Outputs and mean acceptance length (vLLM's definition: 1 + accepted / drafts) of one draft."""
    if name not in run.results:
        target, _ = DEMO_PAIRS[run.case.image_tokens]
        llm = make_llm(target, limit_mm_per_prompt={"image": 2}, max_model_len=2048, disable_log_stats=False,
                       speculative_config={"model": str(run.drafts[name]), "num_speculative_tokens": run.case.k})
        try:
            outputs = chat_tokens(llm, run.prompts, run.case.max_tokens, ignore_eos=False)
            metrics = engine_metrics(llm)
        finally:
            shutdown_llm(llm)
        drafts_made = metrics["vllm:spec_decode_num_drafts"]
        assert metrics["vllm:spec_decode_num_draft_tokens"] == run.case.k * drafts_made > 0
        run.results[name] = outputs, 1 + metrics["vllm:spec_decode_num_accepted_tokens"] / drafts_made
    return run.results[name]


def test_vispec_demo_draft_is_lossless_and_accepted(pair):
    outputs, mean_acceptance_length = speculate(pair, "vispec")
    assert outputs == pair.baseline
    assert mean_acceptance_length > pair.case.min_mean_acceptance_length


def test_the_adaptor_raises_acceptance(pair):
    """With these prompts: measured 3.69 against 3.35 with the adaptor zeroed (36 tokens), and 5.06
    against 4.98 (576: a small margin; on scene-llava-deep, the 576 target before, the adaptor did not
    raise it, 4.75 against 4.78). The zeroed draft is lossless too."""
    outputs, zeroed = speculate(pair, "vispec-adaptor-zeroed")
    assert outputs == pair.baseline
    _, with_adaptor = speculate(pair, "vispec")
    assert with_adaptor > zeroed, (with_adaptor, zeroed)


def test_the_576_target_describes_held_out_scenes(pair):
    """Held-out descriptions (vLLM, no speculation) name objects at their places, and give their size
    and number label (benchmarks/results/description_accuracy_scene-llava-deep-grown.json)."""
    if pair.case.image_tokens != 576:
        pytest.skip("the 36-token target's accuracy is measured by benchmarks/description_accuracy.py")
    from transformers import AutoTokenizer

    scenes = RECIPES[576].scenes
    tokenizer = AutoTokenizer.from_pretrained(DEMO_PAIRS[576][0])
    placed, fully_right, total = 0, 0, 0
    for scenes_, tokens in zip(pair.scenes, pair.baseline, strict=True):
        if len(scenes_) == 1:  # descriptions, not the comparison
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            accuracy = scenes.object_accuracy(text, scenes_[0].objects)
            placed += accuracy.named_in_place
            fully_right += accuracy.fully_right
            total += len(scenes_[0].objects)
    # An object whose sentence lies past the max_tokens cut counts as missed.
    assert total and placed / total >= MIN_PLACED_RATE_576, (placed, total)
    assert fully_right / total >= MIN_FULLY_RIGHT_RATE_576, (fully_right, total)

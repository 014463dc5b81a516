"""Rebuild the shipped demo pairs and their comparison drafts (`vispec-vllm build-demo OUT_DIR`).

1. the target: a small LLaVA-layout model trained from scratch on synthetic scenes
   (`vispec_vllm.demo.target`; 36 or 576 image tokens per image);
2. training records, all teacher-forced through the target with e and h recorded:
   - `generated`: the target's own answers to training prompts (generated with vLLM),
   - `text`: the scene generator's reference descriptions after a text-only prompt (no image),
   - `captions`: training images with the scene generator's short captions;
3. four drafts per seed with the same budget (2 x `epochs` passes over `num_samples` records):
   - vispec:            stage 1 (EAGLE-style) on `generated`, then stage 2 (ViSpec) on `generated`,
   - vispec-no-adaptor: the same with the adaptor held at zero (ablation),
   - eagle:             stage 1 on `generated` for both halves (the same data, no adaptor),
   - eagle-captions:    stage 1 on `text`, then on `captions` (the method's EAGLE baseline: text
                        conversations, then an image-caption fine-tune; no target-generated answers).
Every step resumes: the target from its checkpoint, records by shard, drafts by a completion marker.
Training writes float32 under OUT_DIR/fp32/; the fp16 copies beside them are what
`vispec_vllm/demo/models/` ships.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from vispec_vllm.demo.target import LLAVA15_SCALE, RECIPES, TargetRecipe

DRAFT_KINDS = ("vispec", "eagle", "eagle-captions", "vispec-no-adaptor")
# ViSpec training variants, for choosing the recipe (same data, start and budget as `vispec`).
VISPEC_VARIANTS = {
    "vispec-q8": {"num_q": 8},
    "vispec-mtp3": {"mtp_steps": 3},
    "vispec-reg": {"hidden_regression": True},
    "vispec-lr": {"lr": 1e-3},  # stage 2 at stage 1's learning rate
}
DONE_MARKER = "trained.done"


@dataclass(frozen=True)
class DraftBudget:
    """The same for every draft kind: each trains 2 x `epochs` passes over `num_samples` records."""

    num_samples: int = 240
    epochs: int = 10
    max_tokens: int = 448  # generated answer length cap (the longest reference answer fits)
    stage1_lr: float = 1e-3
    stage2_lr: float = 5e-4


def build_records(target: Path, recipe: TargetRecipe, work: Path, budget: DraftBudget) -> dict[str, Path]:
    """The three record sets of a target (resumable by shard; shards are fixed-size, so a changed
    `num_samples` needs a fresh `work`)."""
    from vispec_vllm.training.data import (
        generate_training_data,
        reference_captions,
        reference_data,
        reference_texts,
        scene_prompts,
    )

    records = {
        "generated": generate_training_data(target, work / "records-generated",
                                            scene_prompts(seed=0, scenes=recipe.scenes), budget.num_samples,
                                            max_tokens=budget.max_tokens),
        "text": reference_data(target, work / "records-text", reference_texts(scenes=recipe.scenes),
                               budget.num_samples),
        "captions": reference_data(target, work / "records-captions", reference_captions(scenes=recipe.scenes),
                                   budget.num_samples),
    }
    return records


def build_records_apart(image_tokens: int, target: Path, work: Path) -> dict[str, Path]:
    """`build_records` in a child process: once a vLLM CPU engine has run in a process, it has pinned
    that process's threads, and the drafts' one-thread training would then share them."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "vispec_vllm.demo.build", str(work), "--image-tokens", str(image_tokens),
                    "--target", str(target), "--records-only"], check=True)
    return build_records(target, RECIPES[image_tokens], work, BUDGETS[image_tokens])  # all shards exist now


def _train_once(target: Path, data: Path, out: Path, cfg, init: Path | None = None) -> Path:
    """Train one stage into `out` unless it finished before (a marker is written last)."""
    from vispec_vllm.training.train import train_draft

    if not (out / DONE_MARKER).exists():
        train_draft(target, data, out, cfg, init_dir=init)
        (out / DONE_MARKER).write_text("")
    return out


def train_drafts(target: Path, records: dict[str, Path], work: Path, seed: int, budget: DraftBudget,
                 kinds: tuple[str, ...] = DRAFT_KINDS) -> dict[str, Path]:
    """The drafts of `kinds` for one training seed, under `work/seed-<seed>/`."""
    from vispec_vllm.training.train import TrainConfig

    stage1 = TrainConfig(stage=1, epochs=budget.epochs, lr=budget.stage1_lr, seed=seed)
    stage2 = TrainConfig(stage=2, epochs=budget.epochs, lr=budget.stage2_lr, seed=seed)
    # Each draft's second half, and the first half it starts from: name -> (records, config, start).
    plan = {
        "stage1-generated": ("generated", stage1, None),
        "eagle": ("generated", stage1, "stage1-generated"),
        "vispec": ("generated", stage2, "stage1-generated"),
        "vispec-no-adaptor": ("generated", replace(stage2, zero_adaptor=True), "stage1-generated"),
        **{name: ("generated", replace(stage2, **changes), "stage1-generated")
           for name, changes in VISPEC_VARIANTS.items()},
        "stage1-text": ("text", stage1, None),
        "eagle-captions": ("captions", stage1, "stage1-text"),
    }

    def trained(name: str) -> Path:
        data, cfg, start = plan[name]
        init = trained(start) if start else None
        return _train_once(target, records[data], draft_dir(work, seed, name), cfg, init)

    return {kind: trained(kind) for kind in kinds}


def build_demo(out_dir: str | Path, recipe: TargetRecipe = LLAVA15_SCALE, target_minutes: float | None = None,
               seed: int = 0) -> dict[str, Path]:
    """Train the target and the four drafts of one seed; export fp16 copies named as shipped."""
    from vispec_vllm.demo.target import train_demo_target

    out_dir = Path(out_dir)
    work = out_dir / "fp32"
    trained_target = work / recipe.name
    if not (trained_target / DONE_MARKER).exists():
        train_demo_target(trained_target, target_minutes, recipe=recipe, threads=2)  # nothing else runs yet
        (trained_target / DONE_MARKER).write_text("")
    # Records and drafts use the fp16 copy that ships, so drafts learn the target that is served.
    shipped = {"target": out_dir / recipe.name}
    export_fp16(trained_target, shipped["target"])
    records = build_records_apart(recipe.num_image_tokens, shipped["target"], work)
    drafts = train_drafts(shipped["target"], records, work, seed, BUDGETS[recipe.num_image_tokens])
    for kind, trained in drafts.items():
        shipped[kind] = out_dir / f"{recipe.name}-{kind}"
        export_fp16(trained, shipped[kind])
    return shipped


def export_fp16(src: Path, dst: Path) -> None:
    """Copy a model directory, casting float weights to fp16 (halves what the repository ships)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.suffix == ".safetensors":
            weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(item).items()}
            save_file(weights, dst / item.name, metadata={"format": "pt"})
        elif item.is_file() and item.suffix in (".json", ".jinja"):
            shutil.copy(item, dst / item.name)


# Per image-token regime: the draft budget (answers of the 36-token scenes are short).
BUDGETS = {36: DraftBudget(max_tokens=160), 576: DraftBudget()}


def draft_dir(work: Path, seed: int, kind: str) -> Path:
    """Where `train_drafts` puts draft `kind` of training seed `seed`."""
    return work / f"seed-{seed}" / kind


def main(argv: list[str] | None = None) -> None:
    """`python -m vispec_vllm.demo.build WORK --image-tokens N --seeds 0 1 2`: the records and the four
    drafts of each seed for the shipped target of regime N (the regime experiment's training half)."""
    import argparse

    from vispec_vllm.demo.models import DEMO_PAIRS

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("work", type=Path)
    parser.add_argument("--image-tokens", type=int, choices=sorted(DEMO_PAIRS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(DRAFT_KINDS), choices=[*DRAFT_KINDS, *VISPEC_VARIANTS])
    parser.add_argument("--target", type=Path, help="default: the shipped target of the regime")
    parser.add_argument("--records-only", action="store_true", help="stop after the records")
    args = parser.parse_args(argv)
    target = args.target or DEMO_PAIRS[args.image_tokens][0]
    budget = BUDGETS[args.image_tokens]
    if args.records_only:
        build_records(target, RECIPES[args.image_tokens], args.work, budget)
        return
    records = build_records_apart(args.image_tokens, target, args.work)
    for seed in args.seeds:
        train_drafts(target, records, args.work, seed, budget, tuple(args.kinds))


if __name__ == "__main__":
    main()

"""Rebuild the shipped demo pairs (`vispec-vllm build-demo OUT_DIR`) and train the drafts the regime
experiment compares (`python -m vispec_vllm.demo.build WORK --recipe NAME --target DIR`).

1. the target: a small LLaVA-layout model trained from scratch on synthetic scenes
   (`vispec_vllm.demo.target`, one recipe per target);
2. training records, all teacher-forced through the target with e and h recorded, from the prompts
   the demo hands training (`vispec_vllm.demo.prompts`; never a held-out layout):
   - `generated`: the target's own answers to training prompts (generated with vLLM),
   - `text`: the scene generator's reference descriptions after a text-only prompt (no image),
   - `captions`: training images with the scene generator's short captions;
3. the drafts of each training seed, all with one budget (`DraftBudget`): the same number of
   optimiser steps (two halves of `epochs` passes over `num_samples` records), the same schedule
   in every half (linear warm-up over its first 1/epochs, then linear decay) and the same peak lr:
   - vispec:            stage 1 (EAGLE-style) on `generated`, then stage 2 (ViSpec) on `generated`,
   - vispec-no-adaptor: the same with the adaptor held at zero (ablation),
   - vispec-keep:       the same with every image row kept (ablation: adaptor and g, no dropping;
                        its config.json says `vispec_keep_image_rows`, served so),
   - eagle:             stage 1 on `generated` in both halves (the same data as ViSpec, no adaptor),
   - eagle-drop:        eagle with every image row dropped (ablation: the image reaches it only
                        through the target's hidden states at text rows; a ViSpec checkpoint
                        with one adaptor query and img_fc = [I | 0], served as ViSpec),
   - eagle-text:        stage 1 on `text` in both halves: no image data at all (the paper's EAGLE-2
                        analogue),
   - eagle-text-drop:   eagle-text with every image row dropped (the text records have none, so it
                        trains as eagle-text does), served so: a text-only draft that meets no image
                        row at serving time either (diagnostic for eagle-text),
   - eagle-captions:    eagle-text, whose last `caption_fraction` of the budget is a fine-tune on
                        `captions` at the lower `caption_lr`;
   and the ViSpec training variants (`VARIANTS`), each with the same budget.
Every step resumes: the target from its checkpoint, records by shard, drafts by a completion marker
(a draft finished under another training config is refused, not reused).
Training writes float32 under OUT_DIR/fp32/; the fp16 copies beside them are what
`vispec_vllm/demo/models/` ships.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vispec_vllm.demo.target import DEEP_GROWN, RECIPES_BY_NAME, TargetRecipe

if TYPE_CHECKING:
    from vispec_vllm.training.train import TrainConfig

DRAFT_KINDS = ("vispec", "eagle", "eagle-text", "eagle-captions", "eagle-drop", "vispec-keep", "vispec-no-adaptor",
               "eagle-text-drop")
# What `build_demo` ships beside each target (vispec_vllm/demo/models), by shipped name: the run of
# the draft plan it is. The ViSpec draft is the regime experiment's best vision-aware variant
# (docs/experiments.md): stage 2 keeping stage 1's hidden-state regression, after a first half that
# never saw an image row. The EAGLE-style draft beside it has the same data and budget.
SHIPPED_DRAFTS = {"vispec": "vispec-drop-reg", "eagle": "eagle"}
# ViSpec training variants: TrainConfig changes to `vispec` (same data, budget, schedule); a change
# that shapes the stage-1 checkpoint too (STAGE1_OPTIONS) applies to both halves.
VARIANTS = {
    "vispec-bias": {"fc_bias": True},  # the published drafts' fc / img_fc biases
    "vispec-q8": {"num_q": 8},
    "vispec-mtp3": {"mtp_steps": 3},
    "vispec-reg": {"hidden_regression": True},
    "vispec-drop": {},
    "vispec-drop-reg": {"hidden_regression": True},
}
STAGE1_OPTIONS = ("fc_bias",)
# The run a variant's stage 2 starts from, where it is not `stage1-generated`: the `-drop` variants
# start from eagle-drop's first half, which never saw an image row, as ViSpec's stage 2 never does.
VARIANT_FIRST_HALVES = {"vispec-drop": "stage1-generated-drop", "vispec-drop-reg": "stage1-generated-drop"}
# How vLLM serves each kind: checkpoints in the EAGLE layout as plain EAGLE (method "eagle"), the
# rest as ViSpec (eagle-drop's stage-1 checkpoint included: it is in the ViSpec layout, num_q = 1).
EAGLE_LAYOUT_KINDS = ("eagle", "eagle-text", "eagle-captions")
DONE_MARKER = "trained.done"
TRAINING_CONFIG = "training_config.json"


@dataclass(frozen=True)
class DraftBudget:
    """The same for every draft kind: each trains 2 x `epochs` x `num_samples` optimiser steps."""

    num_samples: int = 240
    epochs: int = 10
    max_tokens: int = 448  # generated answer length cap (the longest reference answer fits)
    lr: float = 1e-3  # the peak lr of every half of every draft
    caption_fraction: float = 0.1  # of the whole budget: eagle-captions' caption fine-tune
    caption_lr: float = 1e-4

    @property
    def half_steps(self) -> int:
        return self.epochs * self.num_samples

    @property
    def caption_steps(self) -> int:
        return round(self.caption_fraction * 2 * self.half_steps)


def budget_for(recipe: TargetRecipe) -> DraftBudget:
    """The regime experiment's draft budget for a target: answers up to the recipe's longest
    reference answer."""
    return DraftBudget(max_tokens=recipe.max_new_tokens)


def shipped_budget(recipe: TargetRecipe) -> DraftBudget:
    """The budget of the drafts that ship: the recipe's record count, fewer passes over more records
    (the regime experiment's 240 records are a few minutes of generation; its drafts overfit them)."""
    return replace(budget_for(recipe), num_samples=recipe.shipped_draft_records, epochs=recipe.shipped_draft_epochs)


@dataclass(frozen=True)
class TrainingStage:
    """One training run of a draft plan: its records, its config, and the run it starts from."""

    records: str  # "generated", "text" or "captions"
    config: TrainConfig
    start: str | None = None


def draft_plan(budget: DraftBudget, seed: int) -> dict[str, TrainingStage]:
    """Every run the drafts of one training seed need, by name: each draft kind and variant is the
    run of its name, preceded by the run it starts from."""
    from vispec_vllm.training.train import TrainConfig

    stage1 = TrainConfig(stage=1, epochs=budget.epochs, steps=budget.half_steps, lr=budget.lr, seed=seed)
    stage2 = replace(stage1, stage=2)
    drop = replace(stage1, drop_image_rows=True)
    plan = {
        "stage1-generated": TrainingStage("generated", stage1),
        "vispec": TrainingStage("generated", stage2, "stage1-generated"),
        "vispec-no-adaptor": TrainingStage("generated", replace(stage2, zero_adaptor=True), "stage1-generated"),
        "vispec-keep": TrainingStage("generated", replace(stage2, keep_image_rows=True), "stage1-generated"),
        "eagle": TrainingStage("generated", stage1, "stage1-generated"),
        "stage1-generated-drop": TrainingStage("generated", drop),
        "eagle-drop": TrainingStage("generated", drop, "stage1-generated-drop"),
        "stage1-text": TrainingStage("text", stage1),
        "eagle-text": TrainingStage("text", stage1, "stage1-text"),
        "stage1-text-drop": TrainingStage("text", drop),
        "eagle-text-drop": TrainingStage("text", drop, "stage1-text-drop"),
        "stage1-text-before-captions": TrainingStage(
            "text", replace(stage1, steps=budget.half_steps - budget.caption_steps), "stage1-text"),
        "eagle-captions": TrainingStage("captions", replace(stage1, steps=budget.caption_steps, lr=budget.caption_lr),
                                        "stage1-text-before-captions"),
    }
    for name, changes in VARIANTS.items():
        first_half = f"stage1-generated-{name}"
        first_changes = {k: v for k, v in changes.items() if k in STAGE1_OPTIONS}
        if first_changes:
            plan[first_half] = TrainingStage("generated", replace(stage1, **first_changes))
        plan[name] = TrainingStage("generated", replace(stage2, **changes),
                                   first_half if first_changes else VARIANT_FIRST_HALVES.get(name, "stage1-generated"))
    return plan


def runs_of(plan: dict[str, TrainingStage], kind: str) -> list[str]:
    """The runs that make draft `kind`, first half first."""
    runs = [kind]
    while plan[runs[0]].start is not None:
        runs.insert(0, plan[runs[0]].start)
    return runs


def records_needed(budget: DraftBudget, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The record sets (`generated`, `text`, `captions`) that the runs of `kinds` train on, the runs
    they start from included."""
    plan = draft_plan(budget, seed=0)
    return tuple(sorted({plan[name].records for kind in kinds for name in runs_of(plan, kind)}))


def build_records(target: Path, recipe: TargetRecipe, work: Path, budget: DraftBudget,
                  record_sets: tuple[str, ...]) -> dict[str, Path]:
    """The record sets `record_sets` of a target (resumable by shard; shards are fixed-size, so a
    `num_samples` that is no longer a multiple of the shard size needs a fresh `work`)."""
    from vispec_vllm.demo.prompts import reference_captions, reference_texts, scene_prompts
    from vispec_vllm.training.data import generate_training_data, reference_data

    builders = {
        "generated": lambda: generate_training_data(target, work / "records-generated",
                                                    scene_prompts(scenes=recipe.scenes), budget.num_samples,
                                                    max_tokens=budget.max_tokens),
        "text": lambda: reference_data(target, work / "records-text", reference_texts(scenes=recipe.scenes),
                                       budget.num_samples),
        "captions": lambda: reference_data(target, work / "records-captions",
                                           reference_captions(scenes=recipe.scenes), budget.num_samples),
    }
    return {name: builders[name]() for name in record_sets}


def build_records_apart(recipe: TargetRecipe, target: Path, work: Path, shipped: bool,
                        kinds: tuple[str, ...]) -> dict[str, Path]:
    """`build_records` in a child process: once a vLLM CPU engine has run in a process, it has pinned
    that process's threads, and the drafts' one-thread training would then share them."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "vispec_vllm.demo.build", str(work), "--recipe", recipe.name,
                    "--target", str(target), "--records-only", "--kinds", *kinds,
                    *(["--shipped-budget"] if shipped else [])], check=True)
    budget = shipped_budget(recipe) if shipped else budget_for(recipe)
    return build_records(target, recipe, work, budget, records_needed(budget, kinds))  # all shards exist now


def train_once(target: Path, data: Path, out: Path, cfg, init: Path | None = None) -> Path:
    """Train one run into `out` unless it finished before under the same config (a marker is
    written last); a run finished under another config is an error, never silently reused."""
    from vispec_vllm.checkpoint_format import CONFIG_FILE, KEEP_IMAGE_ROWS_KEY, keeps_image_rows
    from vispec_vllm.training.train import train_draft

    requested = json.loads(json.dumps(asdict(cfg)))
    if (out / DONE_MARKER).exists():
        trained_with = json.loads((out / TRAINING_CONFIG).read_text())
        if trained_with != requested:
            changed = sorted(k for k in requested.keys() | trained_with.keys()
                             if requested.get(k) != trained_with.get(k))
            raise RuntimeError(f"{out} was trained with another config ({', '.join(changed)} differ); "
                               "remove it or use a fresh work directory")
        if cfg.keep_image_rows and not keeps_image_rows(json.loads((out / CONFIG_FILE).read_text())):
            # Written before training marked such drafts: served, it would drop the rows it kept.
            raise RuntimeError(f"{out} keeps image rows but its {CONFIG_FILE} lacks {KEEP_IMAGE_ROWS_KEY}: "
                               "remove it and train it again")
        return out
    train_draft(target, data, out, cfg, init_dir=init)
    (out / DONE_MARKER).write_text("")
    return out


def train_drafts(target: Path, records: dict[str, Path], work: Path, seed: int, budget: DraftBudget,
                 kinds: tuple[str, ...] = DRAFT_KINDS) -> dict[str, Path]:
    """The drafts of `kinds` (draft kinds or variants) for one training seed, under `work/seed-<seed>/`."""
    plan = draft_plan(budget, seed)
    unknown = sorted(set(kinds) - set(DRAFT_KINDS) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown draft kinds {unknown}; expected some of {[*DRAFT_KINDS, *VARIANTS]}")

    def trained(name: str) -> Path:
        stage = plan[name]
        init = trained(stage.start) if stage.start else None
        return train_once(target, records[stage.records], draft_dir(work, seed, name), stage.config, init)

    return {kind: trained(kind) for kind in kinds}


def train_drafts_side_by_side(recipe: TargetRecipe, target: Path, work: Path, seed: int,
                              kinds: tuple[str, ...]) -> None:
    """Train each shipped draft in a process of its own, side by side: training runs one thread, and
    the drafts' runs take 31 minutes one after the other on 2 cores, 20 side by side. Only drafts
    that share no run (no two processes may train one run); otherwise `train_drafts` trains them in turn."""
    import subprocess
    import sys

    plan = draft_plan(shipped_budget(recipe), seed)
    chains = [set(runs_of(plan, kind)) for kind in kinds]
    if len(kinds) < 2 or any(a & b for i, a in enumerate(chains) for b in chains[i + 1:]):
        return
    processes = {kind: subprocess.Popen([sys.executable, "-m", "vispec_vllm.demo.build", str(work), "--recipe",
                                         recipe.name, "--target", str(target), "--seeds", str(seed), "--kinds", kind,
                                         "--shipped-budget"]) for kind in kinds}
    failed = [kind for kind, process in processes.items() if process.wait() != 0]
    if failed:
        raise RuntimeError(f"training the {', '.join(failed)} draft failed (its output above); run build-demo again "
                           "to resume")


def build_demo(out_dir: str | Path, recipe: TargetRecipe = DEEP_GROWN, target_minutes: float | None = None,
               seed: int = 0) -> dict[str, Path]:
    """Train the target and the shipped drafts of one seed; export fp16 copies named as shipped."""
    out_dir = Path(out_dir)
    work = out_dir / "fp32"
    base_dir = None
    if recipe.grown_from:  # the base: built beside the target, else the shipped one, else trained here
        base = RECIPES_BY_NAME[recipe.grown_from]
        base_dir = out_dir / base.name
        if not (base_dir / "config.json").exists():
            if (shipped_target(base) / "config.json").exists():
                base_dir = shipped_target(base)
            else:
                build_target(base, work, base_dir)
    build_target(recipe, work, out_dir / recipe.name, target_minutes, base_dir)
    # Records and drafts use the fp16 copy that ships, so drafts learn the target that is served.
    shipped = {"target": out_dir / recipe.name}
    kinds = tuple(SHIPPED_DRAFTS.values())
    records = build_records_apart(recipe, shipped["target"], work, shipped=True, kinds=kinds)
    train_drafts_side_by_side(recipe, shipped["target"], work, seed, kinds)
    drafts = train_drafts(shipped["target"], records, work, seed, shipped_budget(recipe), kinds)  # what is left
    for name, kind in SHIPPED_DRAFTS.items():
        shipped[name] = out_dir / f"{recipe.name}-{name}"
        export_fp16(drafts[kind], shipped[name])
    return shipped


def build_target(recipe: TargetRecipe, work: Path, shipped: Path, minutes: float | None = None,
                 base_dir: Path | None = None) -> None:
    """Train `recipe`'s target in `work` (resuming; a grown recipe from `base_dir`) unless it finished
    its budget, and export its fp16 copy to `shipped`."""
    from vispec_vllm.demo.target import train_demo_target

    trained_target = work / recipe.name
    if not target_trained(trained_target, recipe):
        if (trained_target / DONE_MARKER).exists():  # a finished target trains on: its records and drafts go stale
            (trained_target / DONE_MARKER).unlink()
            forget_derived(work)
        train_demo_target(trained_target, minutes, recipe=recipe, threads=2, base_dir=base_dir)  # nothing else runs
        (trained_target / DONE_MARKER).write_text(_trained_budget(recipe))
    export_fp16(trained_target, shipped)


def _trained_budget(recipe: TargetRecipe) -> str:
    """What a target's done marker holds: a step budget's total steps (empty for a time budget)."""
    return str(recipe.total_steps) if recipe.steps else ""


def target_trained(trained_target: Path, recipe: TargetRecipe) -> bool:
    """Whether `trained_target` finished its recipe's budget. The marker holds the step total, so a
    recipe given more steps (a restart) resumes the training state instead of counting as done."""
    marker = trained_target / DONE_MARKER
    return marker.exists() and marker.read_text() == _trained_budget(recipe)


def forget_derived(work: Path) -> None:
    """Remove the records and drafts in `work`: they were made from a target that has trained on."""
    for derived in [*work.glob("records-*"), *work.glob("seed-*")]:
        shutil.rmtree(derived)


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


def draft_dir(work: Path, seed: int, kind: str) -> Path:
    """Where `train_drafts` puts draft `kind` of training seed `seed`."""
    return work / f"seed-{seed}" / kind


def shipped_target(recipe: TargetRecipe) -> Path:
    """Where a recipe's target ships (vispec_vllm/demo/models/<name>)."""
    from vispec_vllm.demo.models import DEMO_DIR

    return DEMO_DIR / recipe.name


def main(argv: list[str] | None = None) -> None:
    """`python -m vispec_vllm.demo.build WORK --recipe NAME --seeds 0 1 2`: the records and the drafts
    of each seed for a target (the regime experiment's training half)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("work", type=Path)
    parser.add_argument("--recipe", choices=sorted(RECIPES_BY_NAME), required=True, help="the target's recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(DRAFT_KINDS), choices=[*DRAFT_KINDS, *VARIANTS])
    parser.add_argument("--target", type=Path, help="the target directory (default: where the recipe's target ships)")
    parser.add_argument("--records-only", action="store_true", help="stop after the records")
    parser.add_argument("--shipped-budget", action="store_true",
                        help="the shipped drafts' budget instead of the regime experiment's")
    args = parser.parse_args(argv)
    recipe = RECIPES_BY_NAME[args.recipe]
    target = args.target or shipped_target(recipe)
    if not (target / "config.json").is_file():
        parser.error(f"no target at {target}; pass --target DIR")
    kinds = tuple(args.kinds)
    budget = shipped_budget(recipe) if args.shipped_budget else budget_for(recipe)
    if args.records_only:
        build_records(target, recipe, args.work, budget, records_needed(budget, kinds))
        return
    records = build_records_apart(recipe, target, args.work, args.shipped_budget, kinds)
    for seed in args.seeds:
        train_drafts(target, records, args.work, seed, budget, kinds)


if __name__ == "__main__":
    main()

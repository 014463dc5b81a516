"""Rebuild the shipped demo pair and its comparison drafts (`vispec-vllm build-demo OUT_DIR`).

1. the target: a small LLaVA-layout model trained from scratch on synthetic scenes;
2. training records: the target describes training scenes (vLLM), with e and h recorded;
3. three drafts with the same budget, all from one stage-1 start:
   - eagle:             stage 1 (plain EAGLE-style) for 2x`epochs`,
   - vispec:            stage 1 for `epochs`, then stage 2 (ViSpec) for `epochs`,
   - vispec-no-adaptor: the same stage 2 with the adaptor held at zero (ablation).
Training writes float32 under OUT_DIR/fp32/; the fp16 copies beside them (OUT_DIR/scene-llava,
OUT_DIR/scene-llava-<draft>) are what vispec_vllm/demo/models/ ships.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DEMO_EPOCHS = 20  # the published schedule length
DEMO_SAMPLES = 240
DEMO_MAX_TOKENS = 128
STAGE1_LR = 1e-3
STAGE2_LR = 5e-4


def build_demo(out_dir: str | Path, target_minutes: float = 12.0, num_samples: int = DEMO_SAMPLES,
               epochs: int = DEMO_EPOCHS) -> dict[str, Path]:
    from vispec_vllm.demo.target import train_demo_target
    from vispec_vllm.training.data import generate_training_data, scene_prompts
    from vispec_vllm.training.train import TrainConfig, train_draft

    out_dir = Path(out_dir)
    work = out_dir / "fp32"
    target = train_demo_target(work / "scene-llava", target_minutes)
    records = generate_training_data(target, work / "records", scene_prompts(seed=0), num_samples,
                                     max_tokens=DEMO_MAX_TOKENS)
    start = work / "stage1-start"
    train_draft(target, records, start, TrainConfig(stage=1, epochs=epochs, lr=STAGE1_LR))
    drafts = {name: work / f"scene-llava-{name}" for name in ("eagle", "vispec", "vispec-no-adaptor")}
    train_draft(target, records, drafts["eagle"], TrainConfig(stage=1, epochs=epochs, lr=STAGE1_LR), init_dir=start)
    for name, zero_adaptor in (("vispec", False), ("vispec-no-adaptor", True)):
        train_draft(target, records, drafts[name],
                    TrainConfig(stage=2, epochs=epochs, lr=STAGE2_LR, zero_adaptor=zero_adaptor), init_dir=start)
    shutil.rmtree(start)
    shipped = {}
    for name, trained in {"target": target, **drafts}.items():
        shipped[name] = out_dir / trained.name
        export_fp16(trained, shipped[name])
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

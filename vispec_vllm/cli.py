"""`vispec-vllm` command line: `serve` and `bench` (vLLM's own CLI, on either vLLM build), `tiny-models`,
`demo` (the main job), `train` (`data`, `stage1`, `stage2`) and `build-demo`. Tooling is imported
only inside the command that uses it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MODELS_DIR = Path(os.environ.get("VISPEC_VLLM_HOME", Path.home() / ".cache" / "vispec-vllm"))


def _vllm_cli(argv: list[str]) -> None:
    """Hand over to vLLM's own CLI (`vllm serve ...`, `vllm bench serve ...`) in this process, on
    either vLLM build. `--speculative-model` / `--num-speculative-tokens` come from the plugin
    (patches/serve_flags.py)."""
    from vispec_vllm.patches import cli_version

    cli_version.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


def _tiny_models(args: argparse.Namespace) -> None:
    from vispec_vllm.factory.tiny_models import write_tiny_models

    for name, path in write_tiny_models(args.out_dir, seed=args.seed, num_q=args.num_q, write_bin=args.bin).items():
        print(f"{name}: {path}")


def _demo(args: argparse.Namespace) -> None:
    from vispec_vllm.demo.run import DemoOptions, run_demo

    if args.repeats < 1:
        sys.exit(f"--repeats {args.repeats}: at least one repeat is needed")
    if args.warmup_requests < 1:
        sys.exit(f"--warmup-requests {args.warmup_requests}: at least one warm-up request is needed")
    run_demo(DemoOptions(num_requests=args.num_requests, max_tokens=args.max_tokens, repeats=args.repeats,
                         warmup_requests=args.warmup_requests, compiled=args.compiled,
                         num_speculative_tokens=args.num_speculative_tokens, image_tokens=args.image_tokens,
                         out=args.out, logs_dir=DEFAULT_MODELS_DIR))


def _train(args: argparse.Namespace) -> None:
    if args.stage == "data":
        from vispec_vllm.demo.prompts import scene_prompts
        from vispec_vllm.training.data import generate_training_data

        out = generate_training_data(args.target, args.out, scene_prompts(args.seed), args.num_samples,
                                     max_tokens=args.max_tokens, shard_size=args.shard_size)
        print(f"training records: {out}")
        return
    from vispec_vllm.training.train import TrainConfig, train_draft

    cfg = TrainConfig(stage=1 if args.stage == "stage1" else 2, epochs=args.epochs, lr=args.lr, num_q=args.num_q,
                      mtp_steps=args.mtp_steps, zero_adaptor=args.zero_adaptor, seed=args.seed)
    losses = train_draft(args.target, args.data, args.out, cfg, init_dir=args.init)
    print(f"{args.stage}: epoch losses {', '.join(f'{x:.4f}' for x in losses)}; checkpoint in {args.out}")


def _build_demo(args: argparse.Namespace) -> None:
    from vispec_vllm.demo.build import build_demo
    from vispec_vllm.demo.target import RECIPES, RECIPES_BY_NAME

    recipe = RECIPES_BY_NAME[args.recipe] if args.recipe else RECIPES[args.image_tokens]
    for name, path in build_demo(args.out_dir, recipe, args.target_minutes).items():
        print(f"{name}: {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `serve` and `bench` pass every option through to vLLM untouched, so they bypass argparse.
    if argv[:1] in (["serve"], ["bench"]):
        _vllm_cli(argv)
        return
    parser = argparse.ArgumentParser(prog="vispec-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="vllm serve TARGET [vllm serve options]")
    sub.add_parser("bench", help="vllm bench ... (e.g. vllm bench serve)")
    tiny = sub.add_parser("tiny-models", help="write tiny offline targets and ViSpec drafts")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--num-q", type=int, default=2, help="adaptor queries per draft (default 2)")
    tiny.add_argument("--bin", action="store_true", help="also write pytorch_model.bin")
    demo = sub.add_parser("demo", help="serve the shipped demo pair without and with ViSpec "
                          "on held-out prompts: outputs, acceptance, speed-up")
    demo.add_argument("--image-tokens", type=int, default=576, choices=[36, 576],
                      help="which shipped pair: 576 image tokens per image (default) or 36")
    demo.add_argument("--max-tokens", type=int, default=None, help="default: the target's longest answer")
    demo.add_argument("--num-requests", type=int, default=6)
    demo.add_argument("--repeats", type=int, default=3, help="interleaved turns of each server (default 3)")
    demo.add_argument("--warmup-requests", type=int, default=6,
                      help="untimed requests to each server first, on other held-out scenes (default 6)")
    demo.add_argument("--num-speculative-tokens", type=int, default=5)
    demo.add_argument("--compiled", action="store_true",
                      help="both servers under vLLM's default compilation instead of --enforce-eager")
    demo.add_argument("--out", type=Path, default=Path("benchmarks/results/demo.json"),
                      help="where to write the report (JSON)")
    train = sub.add_parser("train", help="generate draft training data, or train a draft (stage 1 or 2)",
                           description="data: the target answers scene prompts and the records are written; "
                           "stage1: plain EAGLE-style draft; stage2: ViSpec draft (from --init stage 1). "
                           "Several processes: torchrun --nproc_per_node N -m vispec_vllm.cli train ...")
    train.add_argument("stage", choices=["data", "stage1", "stage2"])
    train.add_argument("--target", type=Path, required=True, help="target model directory")
    train.add_argument("--out", type=Path, required=True, help="records (data) or checkpoint directory")
    train.add_argument("--data", type=Path, help="records directory (stage1, stage2)")
    train.add_argument("--init", type=Path, help="stage-1 checkpoint to start stage 2 from")
    train.add_argument("--num-samples", type=int, default=1000)
    train.add_argument("--max-tokens", type=int, default=256)
    train.add_argument("--shard-size", type=int, default=64)
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--lr", type=float, default=3e-6, help="published default 3e-6; tiny models train at ~1e-3")
    train.add_argument("--num-q", type=int, default=2)
    train.add_argument("--mtp-steps", type=int, default=1)
    train.add_argument("--zero-adaptor", action="store_true", help="ablation: hold the adaptor output at zero")
    train.add_argument("--seed", type=int, default=0)
    build = sub.add_parser("build-demo", help="rebuild a demo target and its vispec and eagle drafts (the default "
                           "576-token pair on 2 cores: target 126 min, trained on from the shipped scene-llava-deep "
                           "(316 min more where OUT_DIR and the package lack it), records 13 min, drafts 20 min; "
                           "resumable: run it again after an interruption)")
    build.add_argument("out_dir", type=Path)
    build.add_argument("--image-tokens", type=int, default=576, choices=[36, 576])
    build.add_argument("--recipe", choices=["scene-llava", "scene-llava-576", "scene-llava-deep",
                                            "scene-llava-deep-grown"],
                       help="a target recipe by name (overrides --image-tokens; 576 is scene-llava-deep-grown: "
                       "scene-llava-deep trained on for 3,000 steps; scene-llava-deep has 16 decoder layers, "
                       "8,000 + 4,000 training steps and a 2,000-step restart; scene-llava-576 is the earlier "
                       "4-layer target)")
    build.add_argument("--target-minutes", type=float, default=None,
                       help="default: the recipe's (12 for 36, 65 for scene-llava-576); the deep targets train to "
                       "a step budget instead")
    args = parser.parse_args(argv)
    {"tiny-models": _tiny_models, "demo": _demo, "train": _train, "build-demo": _build_demo}[args.command](args)


if __name__ == "__main__":
    main()

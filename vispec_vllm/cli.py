"""`vispec-vllm` command line: serve, tiny-models, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODELS_DIR = Path(os.environ.get("VISPEC_VLLM_HOME", Path.home() / ".cache" / "vispec-vllm"))


def _serve(argv: list[str]) -> None:
    """Hand over to vLLM's own `vllm serve` in this process, on either vLLM build.
    `--speculative-model` / `--num-speculative-tokens` come from the plugin (patches/serve_flags.py)."""
    from vispec_vllm.patches import cli_version

    cli_version.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()


def _tiny_models(args: argparse.Namespace) -> None:
    from vispec_vllm.tiny_models import write_tiny_models

    for name, path in write_tiny_models(args.out_dir, seed=args.seed, num_q=args.num_q, write_bin=args.bin).items():
        print(f"{name}: {path}")


def ensure_tiny_models(models_dir: Path = DEFAULT_MODELS_DIR / "tiny-models") -> Path:
    """Write the tiny models once; later calls reuse them."""
    from vispec_vllm.tiny_models import write_tiny_models

    done = models_dir / ".complete"
    if not done.exists():
        write_tiny_models(models_dir)
        done.write_text("seed=0 num_q=2\n")
    return models_dir


def mean_acceptance_length(metrics_text: str) -> float | None:
    """vLLM's own definition: 1 + accepted draft tokens / drafts, from the Prometheus counters."""
    counters = {}
    for line in metrics_text.splitlines():
        for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total"):
            if line.startswith(name):
                counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    drafts = counters.get("vllm:spec_decode_num_drafts_total", 0.0)
    if not drafts:
        return None
    return 1.0 + counters.get("vllm:spec_decode_num_accepted_tokens_total", 0.0) / drafts


def _demo(args: argparse.Namespace) -> None:
    from PIL import Image, ImageDraw

    from vispec_vllm.server import VLLMServer, image_data_url

    models = ensure_tiny_models()
    target, draft = models / "tiny-llava", models / "tiny-llava-vispec"
    spec = {"model": str(draft), "num_speculative_tokens": args.num_speculative_tokens}
    serve_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                  "--limit-mm-per-prompt", '{"image": 1}', "--speculative-config", json.dumps(spec)]
    log = DEFAULT_MODELS_DIR / "demo-server.log"
    print(f"Serving {target}\n  with ViSpec draft {draft} (K={args.num_speculative_tokens})\n"
          f"  on 127.0.0.1 through vLLM with the vispec-vllm plugin (log: {log}) ...")
    t0 = time.monotonic()
    with VLLMServer(target, serve_args, log_path=log) as server:
        print(f"Server healthy after {time.monotonic() - t0:.1f} s; sending image+text requests.")
        for colour in ("red", "blue", "green", "orange"):
            image = Image.new("RGB", (112, 112), "white")
            ImageDraw.Draw(image).ellipse((8, 8, 80, 80), fill=colour)
            status, body = server.chat(
                [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                 {"type": "text", "text": "Describe the image in detail."}],
                max_tokens=args.max_tokens,
            )
            if status != 200:
                sys.exit(f"request failed with HTTP {status}: {body}")
            usage = body["usage"]
            print(f"  {colour} image -> ({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion "
                  f"tokens) {body['choices'][0]['message']['content']!r}")
        acceptance = mean_acceptance_length(server.metrics())
    print(f"Mean acceptance length (vLLM's 1 + accepted/drafts): "
          f"{'n/a' if acceptance is None else f'{acceptance:.2f}'}")
    print("(The tiny draft has random weights, so it is rarely accepted; outputs are the target's own.)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `serve` passes every option through to vLLM untouched, so it bypasses argparse.
    if argv[:1] == ["serve"]:
        _serve(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="vispec-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="vllm serve TARGET [vllm serve options]")
    tiny = sub.add_parser("tiny-models", help="write tiny offline targets and ViSpec drafts")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--num-q", type=int, default=2, help="adaptor queries per draft (default 2)")
    tiny.add_argument("--bin", action="store_true", help="also write pytorch_model.bin")
    demo = sub.add_parser("demo", help="serve the embedded default and answer one image+text request")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--num-speculative-tokens", type=int, default=3)
    args = parser.parse_args(argv)
    {"tiny-models": _tiny_models, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    main()

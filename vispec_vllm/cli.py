"""`vispec-vllm` command line: serve, tiny-models, demo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_MODELS_DIR = Path(os.environ.get("VISPEC_VLLM_HOME", Path.home() / ".cache" / "vispec-vllm"))


def _serve(argv: list[str]) -> None:
    """Hand over to vLLM's own `vllm serve` in this process, on either vLLM build."""
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


def _demo(args: argparse.Namespace) -> None:
    from PIL import Image, ImageDraw

    from vispec_vllm.server import VLLMServer, image_data_url

    target = ensure_tiny_models() / "tiny-llava"
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill="red")
    serve_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                  "--limit-mm-per-prompt", '{"image": 1}']
    log = DEFAULT_MODELS_DIR / "demo-server.log"
    print(f"Serving {target} on 127.0.0.1 through vLLM with the vispec-vllm plugin (log: {log}) ...")
    t0 = time.monotonic()
    with VLLMServer(target, serve_args, log_path=log) as server:
        print(f"Server healthy after {time.monotonic() - t0:.1f} s; sending one image+text request.")
        status, body = server.chat(
            [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
             {"type": "text", "text": "Describe the image in detail."}],
            max_tokens=args.max_tokens,
        )
    if status != 200:
        sys.exit(f"request failed with HTTP {status}: {body}")
    usage = body["usage"]
    print(f"Answer ({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens): "
          f"{body['choices'][0]['message']['content']!r}")


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
    args = parser.parse_args(argv)
    {"tiny-models": _tiny_models, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    main()

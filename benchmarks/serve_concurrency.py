"""Throughput under concurrent load: a server without speculation, with ViSpec (load-adaptive,
the default) and, if a draft exists, with plain EAGLE-style speculation, each driven by vLLM's
own `vllm bench serve` with image+text requests at several concurrencies.

    python benchmarks/serve_concurrency.py                   # the shipped demo pair, 1..64
    python benchmarks/serve_concurrency.py --target DIR --vispec DIR [--eagle DIR] --concurrency 1 4

Writes benchmarks/results/serve_concurrency.json (one row per mode and concurrency) and a PNG
(output tokens/s and the ratio to no speculation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from acceptance import RESULTS, machine_description, write_report  # noqa: E402

SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "64",
               "--limit-mm-per-prompt", '{"image": 1}', "--mm-processor-cache-gb", "0"]


def write_dataset(directory: Path, num_images: int) -> Path:
    """Held-out scene images as PNG files plus the JSONL that `vllm bench serve` reads."""
    from vispec_vllm.scenes import DESCRIBE_PROMPT, HELD_OUT_START, make_scene

    lines = []
    for i in range(num_images):
        path = directory / f"scene-{i}.png"
        make_scene(HELD_OUT_START + i).image.save(path)
        lines.append(json.dumps({"prompt": DESCRIBE_PROMPT, "image_files": [str(path)]}))
    dataset = directory / "scenes.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    return dataset


def bench(server, dataset: Path, concurrency: int, num_prompts: int, output_len: int, result_dir: Path) -> dict:
    name = f"c{concurrency}.json"
    cmd = [sys.executable, "-m", "vispec_vllm.cli", "bench", "serve", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", server.base_url, "--model", server.model,
           "--dataset-name", "custom_image", "--dataset-path", str(dataset), "--custom-output-len", str(output_len),
           "--custom-ensure-client-side-data", "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--request-rate", "inf", "--temperature", "0",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", name, "--disable-tqdm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return json.loads((result_dir / name).read_text())


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, ratio) = plt.subplots(1, 2, figsize=(10, 4))
    baseline = {r["concurrency"]: r["output_tok_s"] for r in report["runs"] if r["mode"] == "none"}
    for mode in dict.fromkeys(r["mode"] for r in report["runs"]):
        rows = sorted((r["concurrency"], r["output_tok_s"]) for r in report["runs"] if r["mode"] == mode)
        throughput.plot(*zip(*rows, strict=True), "-o", label=mode)
        if mode != "none":
            ratio.plot([c for c, _ in rows], [v / baseline[c] for c, v in rows], "-o", label=mode)
    for ax, label in ((throughput, "output tokens/s"), (ratio, "ratio to no speculation")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ratio.axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(f"{report['target']} + {report['draft']} ({report['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from vispec_vllm.demo_models import DEMO_DRAFTS, DEMO_TARGET
    from vispec_vllm.server import VLLMServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=DEMO_TARGET)
    parser.add_argument("--vispec", type=Path, default=DEMO_DRAFTS["vispec"])
    parser.add_argument("--eagle", default=str(DEMO_DRAFTS["eagle"]), help="plain EAGLE draft ('' for none)")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--prompts-per-concurrency", type=int, default=2,
                        help="requests per run = this x concurrency (at least 8)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_concurrency.json")
    args = parser.parse_args()

    k = args.num_speculative_tokens
    modes = [("none", False, []),
             ("vispec", True, ["--speculative-config", json.dumps({"model": str(args.vispec),
                                                                   "num_speculative_tokens": k})])]
    if args.eagle:
        modes.append(("eagle", False, ["--speculative-config", json.dumps(
            {"method": "eagle", "model": args.eagle, "num_speculative_tokens": k})]))
    report = {"machine": machine_description(), "target": args.target.name, "draft": args.vispec.name, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = write_dataset(tmp, num_images=64)
        for mode, adaptive, spec_args in modes:
            with VLLMServer(args.target, SERVER_ARGS + spec_args, log_path=tmp / f"{mode}.log",
                            startup_timeout_s=300) as server:
                for concurrency in args.concurrency:
                    result = bench(server, dataset, concurrency, max(8, args.prompts_per_concurrency * concurrency),
                                   args.output_len, tmp / mode)
                    row = {"mode": mode, "adaptive": adaptive, "concurrency": concurrency,
                           "output_tok_s": result["output_throughput"], "ttft_ms_p50": result["median_ttft_ms"],
                           "itl_ms_p50": result["median_itl_ms"], "itl_ms_p99": result["p99_itl_ms"],
                           "mean_acceptance_length": result.get("spec_decode_acceptance_length")}
                    report["runs"].append(row)
                    print(json.dumps(row), flush=True)
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()

"""Throughput under concurrent load: a server without speculation, with ViSpec (load-adaptive,
the default, and with a fixed K) and, if a draft exists, with plain EAGLE-style speculation, each
driven by vLLM's own `vllm bench serve` with image+text requests at several concurrencies. Each
row also records the batch the engine really ran (mean of the running-request gauge) and its
step count, which the cost model (benchmarks/cost_model.py) needs.

    python benchmarks/serve_concurrency.py                   # the shipped demo pair, 1..64
    python benchmarks/serve_concurrency.py --target DIR --vispec DIR [--eagle DIR] --concurrency 1 4

Writes benchmarks/results/serve_concurrency.json (one row per mode and concurrency) and a PNG
(output tokens/s and the ratio to no speculation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from acceptance import RESULTS, machine_description, write_report  # noqa: E402

SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "64",
               "--limit-mm-per-prompt", '{"image": 1}', "--mm-processor-cache-gb", "0"]


SETUP_NAMES = ("none", "vispec", "vispec-fixed", "eagle")


def setup_name(row: dict) -> str:
    return "vispec-fixed" if row["mode"] == "vispec" and not row["adaptive"] else row["mode"]


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


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (over labels such as the engine index)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(metrics_text))


class EngineLoadSampler:
    """Samples the server's running-request gauge while a benchmark runs, and counts engine
    steps: the cost model needs the batch the engine really ran, which on a busy CPU can be well
    below the client's concurrency."""

    def __init__(self, server, interval_s: float = 0.1):
        self.server, self.interval_s = server, interval_s
        self.running_samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.running_samples.append(metric_value(self.server.metrics(), "vllm:num_requests_running"))

    def __enter__(self) -> EngineLoadSampler:
        self._steps_before = metric_value(self.server.metrics(), "vllm:iteration_tokens_total_count")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        steps_after = metric_value(self.server.metrics(), "vllm:iteration_tokens_total_count")
        self.engine_steps = steps_after - self._steps_before

    def mean_running_requests(self) -> float | None:
        busy = [n for n in self.running_samples if n > 0]
        return sum(busy) / len(busy) if busy else None


def bench(server, dataset: Path, concurrency: int, num_prompts: int, output_len: int, result_dir: Path) -> dict:
    name = f"c{concurrency}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "vispec_vllm.cli", "bench", "serve", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", server.base_url, "--model", server.model,
           "--dataset-name", "custom_image", "--dataset-path", str(dataset), "--custom-output-len", str(output_len),
           "--custom-ensure-client-side-data", "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--request-rate", "inf", "--temperature", "0",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", name, "--disable-tqdm"]
    with EngineLoadSampler(server) as load:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    result = json.loads((result_dir / name).read_text())
    result["mean_running_requests"] = load.mean_running_requests()
    result["engine_steps"] = load.engine_steps
    return result


def summary_row(mode: str, adaptive: bool, concurrency: int, repeats: list[dict]) -> dict:
    """One JSON row from repeated `vllm bench serve` results: the median run by output tokens/s."""
    repeats = sorted(repeats, key=lambda r: r["output_throughput"])
    result = repeats[len(repeats) // 2]
    drafts = result.get("spec_decode_num_drafts")
    return {"mode": mode, "adaptive": adaptive, "concurrency": concurrency,
            "output_tok_s": result["output_throughput"], "ttft_ms_p50": result["median_ttft_ms"],
            "itl_ms_p50": result["median_itl_ms"], "itl_ms_p99": result["p99_itl_ms"],
            "mean_acceptance_length": result.get("spec_decode_acceptance_length"),
            "mean_draft_tokens": result["spec_decode_draft_tokens"] / drafts if drafts else None,
            "mean_running_requests": result["mean_running_requests"], "engine_steps": result["engine_steps"],
            "output_tokens": result["total_output_tokens"], "duration_s": result["duration"],
            "output_tok_s_repeats": [r["output_throughput"] for r in repeats]}


def plot(report: dict, path: Path) -> None:
    """Output tokens/s, ratio to no speculation, TTFT p50, ITL p50 (solid) and p99 (dashed), and
    mean acceptance length, per set-up against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    throughput, ratio, acceptance, ttft, itl, unused = axes.flat
    unused.axis("off")
    baseline = {r["concurrency"]: r["output_tok_s"] for r in report["runs"] if r["mode"] == "none"}
    for name in dict.fromkeys(setup_name(r) for r in report["runs"]):
        rows = sorted((r for r in report["runs"] if setup_name(r) == name), key=lambda r: r["concurrency"])
        concurrency = [r["concurrency"] for r in rows]
        line, = throughput.plot(concurrency, [r["output_tok_s"] for r in rows], "-o", ms=3, label=name)
        colour = line.get_color()
        ttft.plot(concurrency, [r["ttft_ms_p50"] for r in rows], "-o", ms=3, color=colour, label=name)
        itl.plot(concurrency, [r["itl_ms_p50"] for r in rows], "-o", ms=3, color=colour, label=f"{name} p50")
        itl.plot(concurrency, [r["itl_ms_p99"] for r in rows], "--", color=colour, label=f"{name} p99")
        if name != "none":
            paired = [(r["concurrency"], r["output_tok_s"] / baseline[r["concurrency"]]) for r in rows
                      if r["concurrency"] in baseline]
            if paired:
                ratio.plot(*zip(*paired, strict=True), "-o", ms=3, color=colour, label=name)
            acceptance.plot(concurrency, [r["mean_acceptance_length"] for r in rows], "-o", ms=3, color=colour,
                            label=name)
    for ax, label in ((throughput, "output tokens/s"), (ratio, "ratio to no speculation"),
                      (acceptance, "mean acceptance length"), (ttft, "TTFT p50 (ms)"), (itl, "ITL (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ratio.axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(f"{report['target']} + {report['draft']} ({report['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from vispec_vllm.demo_models import DEMO_DRAFTS, DEMO_TARGET
    from vispec_vllm.server import VLLMServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=DEMO_TARGET)
    parser.add_argument("--vispec", type=Path, default=DEMO_DRAFTS["vispec"])
    parser.add_argument("--eagle", default=str(DEMO_DRAFTS["eagle"]), help="plain EAGLE draft ('' for none)")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--prompts-per-concurrency", type=int, default=4,
                        help="requests per run = this x concurrency (at least 4 x this)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per concurrency; rows report the median")
    parser.add_argument("--runs", nargs="+", default=list(SETUP_NAMES), choices=SETUP_NAMES,
                        help="server set-ups to measure (vispec: load-adaptive; vispec-fixed: K every step)")
    parser.add_argument("--merge", action="store_true", help="replace only these set-ups' rows in --out")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_concurrency.json")
    args = parser.parse_args()

    k = args.num_speculative_tokens
    vispec_config = ["--speculative-config", json.dumps({"model": str(args.vispec), "num_speculative_tokens": k})]
    eagle_config = ["--speculative-config", json.dumps({"method": "eagle", "model": args.eagle,
                                                        "num_speculative_tokens": k})]
    # name -> (mode, adaptive, serve args, environment)
    server_setups = {"none": ("none", False, [], {}),
                     "vispec": ("vispec", True, vispec_config, {"VISPEC_VLLM_ADAPTIVE": "1"}),
                     "vispec-fixed": ("vispec", False, vispec_config, {"VISPEC_VLLM_ADAPTIVE": "0"}),
                     "eagle": ("eagle", False, eagle_config, {})}
    runs = [name for name in args.runs if name != "eagle" or args.eagle]
    report = {"machine": machine_description(), "target": args.target.name, "draft": args.vispec.name, "runs": []}
    if args.merge and args.out.exists():
        # Rerunning some setups: keep the other setups' rows.
        report["runs"] = [row for row in json.loads(args.out.read_text())["runs"]
                          if setup_name(row) not in runs]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers_running:
        tmp = Path(tmp)
        dataset = write_dataset(tmp, num_images=64)
        # All set-ups' servers run side by side (idle ones cost nothing) and take turns, repeat by
        # repeat: drift in a shared machine's speed then hits every set-up alike.
        servers = {}
        for name in runs:
            _, _, spec_args, env = server_setups[name]
            servers[name] = servers_running.enter_context(VLLMServer(
                args.target, SERVER_ARGS + spec_args, log_path=tmp / f"{name}.log", startup_timeout_s=300, env=env))
        rows = []
        for concurrency in args.concurrency:
            num_prompts = args.prompts_per_concurrency * max(4, concurrency)
            results = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name in runs:
                    results[name].append(bench(servers[name], dataset, concurrency, num_prompts, args.output_len,
                                               tmp / name))
            for name in runs:
                mode, adaptive, _, _ = server_setups[name]
                rows.append(summary_row(mode, adaptive, concurrency, results[name]))
                print(json.dumps(rows[-1]), flush=True)
    report["runs"] += sorted(rows, key=lambda row: (runs.index(setup_name(row)), row["concurrency"]))
    write_report(report, args.out, plot)


if __name__ == "__main__":
    main()

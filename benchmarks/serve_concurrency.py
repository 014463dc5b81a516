"""Throughput under concurrent load: a server without speculation, with ViSpec (load-adaptive, the
default, and at each fixed K of --fixed-ks) and, if a draft exists, with plain EAGLE-style speculation, each driven
by vLLM's own benchmark client (`vllm bench serve`) with image+text requests at several
concurrencies. Each row also records the batch the engine really ran (mean of the running-request
gauge) and its step count, which the cost model (benchmarks/cost_model.py) needs.

    python benchmarks/serve_concurrency.py                   # the default demo pair, 1..64, 5 repeats
    python benchmarks/serve_concurrency.py --fixed-ks 1 2 3 4 5   # the schedule against every fixed K
    python benchmarks/serve_concurrency.py --target DIR --vispec DIR [--eagle DIR] --concurrency 1 4
    python benchmarks/serve_concurrency.py --estimate-only   # how long a run would take
    python benchmarks/serve_concurrency.py --smoke ...       # one tiny setting (tests)

How it measures:
- All set-ups' servers run side by side (idle ones cost nothing) and take turns: each repeat runs
  every set-up once at each concurrency, in an order rotated from repeat to repeat, so drift in a
  shared machine's speed hits every set-up alike.
- Each server gets a warm-up run (its own held-out scenes) before anything is measured.
- Every request carries its own held-out scene image (seeded by --seed): unique per request and per
  repeat, the same across set-ups within a repeat. Prefix caching stays on (vLLM's default) but
  never hits past the chat template's first tokens; the client's single-prompt ready check is
  skipped, as it would send (and cache) the first request's prompt.
- Each row gives the median over repeats as `output_tok_s`, with `output_tok_s_min`/`_max`, and the
  ratio to no speculation as the median (and min, max) of per-repeat ratios (the set-ups' runs of
  one repeat are paired). Other fields are medians over repeats.
- Engine batch: the running-request gauge sampled every 0.1 s, averaged from the first sample
  with a running request to the last one of the run, idle (zero) samples in between included.

Writes benchmarks/results/serve_concurrency.json (one row per set-up and concurrency) and a PNG
(output tokens/s and the ratio to no speculation with min-max error bars, acceptance, TTFT, ITL,
engine batch).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from common import (
    RESULTS,
    describe_prompt,
    format_duration,
    held_out_scene_seed,
    machine_description,
    pyplot,
    spread_fields,
    start_servers,
    write_json,
    write_report,
    write_scene_images,
)

SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "64",
               "--limit-mm-per-prompt", '{"image": 1}', "--mm-processor-cache-gb", "0"]
SETUP_NAMES = ("none", "vispec", "vispec-fixed", "eagle")  # vispec-fixed: one server per K of --fixed-ks
# For the duration estimate, from this 2-core machine while shared: two servers were up after ~185 s
# (four take longer), and each in-process client call spent ~0.5 s beyond the run it measured.
STARTUP_S = 300.0
CALL_OVERHEAD_S = 1.0
FALLBACK_TOK_S = 300.0
SMOKE = {"concurrency": [2], "prompts_per_concurrency": 2, "output_len": 16, "repeats": 2, "warmup_prompts": 2}


def fixed_setup(k: int) -> str:
    return f"vispec-fixed-k{k}"


def setup_name(row: dict) -> str:
    """A row's set-up: "none", "vispec" (adaptive), "eagle", or "vispec-fixed-k<K>" ("vispec-fixed" in
    files whose rows do not name their K)."""
    if row["mode"] == "vispec" and not row["adaptive"]:
        return fixed_setup(row["num_speculative_tokens"]) if "num_speculative_tokens" in row else "vispec-fixed"
    return row["mode"]


def num_prompts(prompts_per_concurrency: int, concurrency: int, min_prompts: int | None = None) -> int:
    """Requests of one run: this many per concurrency, and at least `min_prompts` (default: four
    times the requests per concurrency). Runs at low concurrency are short; more requests there
    narrow their spread from repeat to repeat."""
    return max(4 * prompts_per_concurrency if min_prompts is None else min_prompts,
               prompts_per_concurrency * concurrency)


def write_dataset(path: Path, image_dir: Path, scene_seeds: list[int], image_tokens: int) -> Path:
    """The JSONL that `vllm bench serve --dataset-name custom_image` reads: one held-out scene
    image (written as PNG) and the describe prompt per line, each line used exactly once."""
    prompt = describe_prompt(image_tokens)
    images = write_scene_images(image_dir, scene_seeds, image_tokens)
    path.write_text("".join(json.dumps({"prompt": prompt, "image_files": [str(image)]}) + "\n" for image in images))
    return path


class EngineLoadSampler:
    """Samples the server's running-request gauge while a benchmark runs, and counts engine steps:
    the cost model needs the batch the engine really ran, which on a busy CPU can be well below
    the client's concurrency."""

    COUNTERS = {"engine_steps": "vllm:iteration_tokens_total_count",
                "prefix_cache_queries": "vllm:prefix_cache_queries_total",  # prompt tokens looked up
                "prefix_cache_hits": "vllm:prefix_cache_hits_total"}

    def __init__(self, server, interval_s: float = 0.1):
        self.server, self.interval_s = server, interval_s
        self.running_samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        from vispec_vllm.demo.server import metric_total

        while not self._stop.wait(self.interval_s):
            self.running_samples.append(metric_total(self.server.metrics(), "vllm:num_requests_running"))

    def _counters(self) -> dict[str, float]:
        from vispec_vllm.demo.server import metric_total

        metrics = self.server.metrics()
        return {name: metric_total(metrics, metric) for name, metric in self.COUNTERS.items()}

    def __enter__(self) -> EngineLoadSampler:
        self._before = self._counters()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        after = self._counters()
        self.counted = {name: after[name] - self._before[name] for name in after}

    def mean_running_requests(self) -> float | None:
        """Mean over the run: from the first sample with a running request to the last one, zeros
        in between (moments the engine had nothing to run) included."""
        busy = [i for i, n in enumerate(self.running_samples) if n > 0]
        if not busy:
            return None
        window = self.running_samples[busy[0]:busy[-1] + 1]
        return sum(window) / len(window)


def bench_client():
    """vLLM's benchmark client, in this process (a `vllm bench serve` process per call would spend
    tens of seconds importing vLLM each time). Returns run(argv) -> result dict."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)

    def run(argv: list[str]) -> dict:
        log = io.StringIO()  # the client's own report; shown only when it fails
        try:
            with contextlib.redirect_stdout(log):
                return bench_main(parser.parse_args(argv))
        except BaseException:
            print(log.getvalue()[-4000:], file=sys.stderr)
            raise

    return run


def bench(client, server, dataset: Path, concurrency: int, prompts: int, output_len: int) -> dict:
    argv = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", server.base_url,
            "--model", server.model, "--dataset-name", "custom_image", "--dataset-path", str(dataset),
            "--custom-output-len", str(output_len), "--custom-ensure-client-side-data", "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--request-rate", "inf", "--temperature", "0",
            # The ready check would send the dataset's first prompt once more (a prefix-cache hit).
            "--ready-check-timeout-sec", "0", "--disable-tqdm"]
    started = time.monotonic()
    with EngineLoadSampler(server) as load:
        result = client(argv)
    if result["completed"] != prompts:
        raise RuntimeError(f"{server.base_url}: {prompts - result['completed']} of {prompts} requests failed")
    result["mean_running_requests"] = load.mean_running_requests()
    result["engine_steps"] = load.counted["engine_steps"]
    queried = load.counted["prefix_cache_queries"]
    result["prefix_cache_hit_rate"] = load.counted["prefix_cache_hits"] / queried if queried else None
    result["wall_s"] = time.monotonic() - started
    return result


class ServerSetup(NamedTuple):
    """One server of the benchmark: what it drafts with, and how it is started."""

    mode: str  # "none", "vispec" or "eagle"
    adaptive: bool  # the load-adaptive schedule on
    k: int | None  # draft tokens per step (for an adaptive server, the most it drafts); None: no speculation
    serve_args: list[str]  # `vllm serve` arguments beyond SERVER_ARGS
    env: dict[str, str]  # environment of the server process


def speculation_setups(vispec: Path, eagle: str, adaptive_k: int, fixed_ks: list[int], eagle_k: int
                       ) -> dict[str, ServerSetup]:
    """Set-up name -> its server, for the ViSpec draft `vispec` (load-adaptive up to `adaptive_k`,
    and fixed at each of `fixed_ks`) and the plain EAGLE draft `eagle` at `eagle_k`."""
    def vispec_config(k: int) -> list[str]:
        return ["--speculative-config", json.dumps({"model": str(vispec), "num_speculative_tokens": k})]

    eagle_config = ["--speculative-config", json.dumps({"method": "eagle", "model": eagle,
                                                        "num_speculative_tokens": eagle_k})]
    setups = {"none": ServerSetup("none", False, None, [], {}),
              "vispec": ServerSetup("vispec", True, adaptive_k, vispec_config(adaptive_k),
                                    {"VISPEC_VLLM_ADAPTIVE": "1"})}
    for k in fixed_ks:
        setups[fixed_setup(k)] = ServerSetup("vispec", False, k, vispec_config(k), {"VISPEC_VLLM_ADAPTIVE": "0"})
    setups["eagle"] = ServerSetup("eagle", False, eagle_k, eagle_config, {})
    return setups


def run_interleaved(args: argparse.Namespace, servers_to_start: dict[str, tuple[list[str], dict[str, str]]],
                    started: float, after_repeat: Callable[[dict, int], None] | None = None
                    ) -> dict[tuple[str, int], list[dict]]:
    """Start the servers (name -> (serve arguments, environment)) side by side on `args.target`, give
    each a warm-up run, then run `args.repeats` repeats in which every server runs once at each of
    `args.concurrency`, in an order rotated from repeat to repeat, on held-out scenes new to every
    repeat and the same for every server within it. Returns (name, concurrency) -> `bench` results,
    one per repeat. Reads args.target, image_tokens, seed, warmup_prompts, concurrency,
    prompts_per_concurrency, min_prompts, output_len, repeats and server_logs.
    `after_repeat(results so far, repeats done)` runs after each repeat."""
    runs = list(servers_to_start)
    client = bench_client()
    scene_index = 0

    def next_scenes(count: int) -> list[int]:
        nonlocal scene_index
        seeds = [held_out_scene_seed(scene_index + i, args.seed) for i in range(count)]
        scene_index += count
        return seeds

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers_running:
        tmp = Path(tmp)
        log_dir = args.server_logs or tmp
        log_dir.mkdir(parents=True, exist_ok=True)
        servers = start_servers(servers_running, servers_to_start, args.target, log_dir)
        print(f"{len(servers)} servers up after {time.monotonic() - started:.0f} s", flush=True)
        warmup = write_dataset(tmp / "warmup.jsonl", tmp / "images", next_scenes(args.warmup_prompts),
                               args.image_tokens)
        for name in runs:
            bench(client, servers[name], warmup, min(4, args.warmup_prompts), args.warmup_prompts, args.output_len)
        results = {(name, c): [] for name in runs for c in args.concurrency}
        for repeat in range(args.repeats):
            order = runs[repeat % len(runs):] + runs[:repeat % len(runs)]
            for concurrency in args.concurrency:
                prompts = num_prompts(args.prompts_per_concurrency, concurrency, args.min_prompts)
                dataset = write_dataset(tmp / f"c{concurrency}-r{repeat}.jsonl", tmp / "images", next_scenes(prompts),
                                        args.image_tokens)
                for name in order:
                    result = bench(client, servers[name], dataset, concurrency, prompts, args.output_len)
                    results[(name, concurrency)].append(result)
                    print(f"repeat {repeat + 1}/{args.repeats} {name:12s} c={concurrency:3d}: "
                          f"{result['output_throughput']:8.1f} tok/s, ITL p50 {result['median_itl_ms']:.1f} ms, "
                          f"engine batch {result['mean_running_requests'] or 0:.1f} "
                          f"({format_duration(time.monotonic() - started)} elapsed)", flush=True)
            if after_repeat is not None:
                after_repeat(results, repeat + 1)
    return results


def per_repeat_values(result: dict) -> dict:
    drafts = result.get("spec_decode_num_drafts")
    return {"output_tok_s": result["output_throughput"], "ttft_ms_p50": result["median_ttft_ms"],
            "itl_ms_p50": result["median_itl_ms"], "itl_ms_p99": result["p99_itl_ms"],
            "mean_acceptance_length": result.get("spec_decode_acceptance_length"),
            "mean_draft_tokens": result["spec_decode_draft_tokens"] / drafts if drafts else None,
            "mean_running_requests": result["mean_running_requests"], "engine_steps": result["engine_steps"],
            "output_tokens": result["total_output_tokens"], "duration_s": result["duration"],
            "wall_s": result["wall_s"], "prefix_cache_hit_rate": result["prefix_cache_hit_rate"]}


def summary_row(mode: str, adaptive: bool, k: int | None, concurrency: int, prompts: int, repeats: list[dict],
                baseline: list[dict] | None) -> dict:
    """One JSON row from one set-up's runs at one concurrency, repeat by repeat (`baseline`: the
    runs without speculation of the same repeats)."""
    values = [per_repeat_values(r) for r in repeats]
    row = {"mode": mode, "adaptive": adaptive, "num_speculative_tokens": k, "concurrency": concurrency,
           "num_prompts": prompts, "repeats": len(values)}
    row |= spread_fields("output_tok_s", [v["output_tok_s"] for v in values])
    ratios = None
    if baseline is not None and mode != "none":
        ratios = [v["output_tok_s"] / b["output_throughput"] for v, b in zip(values, baseline, strict=True)]
    row |= spread_fields("ratio_to_none", ratios or [])
    # Prompt tokens found in the prefix cache: near zero, as every request has its own image.
    row |= spread_fields("prefix_cache_hit_rate", [v["prefix_cache_hit_rate"] for v in values])
    for field in ("ttft_ms_p50", "itl_ms_p50", "itl_ms_p99", "mean_acceptance_length", "mean_draft_tokens",
                  "mean_running_requests", "engine_steps", "output_tokens", "duration_s", "wall_s"):
        present = [v[field] for v in values if v[field] is not None]
        row[field] = statistics.median(present) if present else None
    row["output_tok_s_repeats"] = [v["output_tok_s"] for v in values]
    row["ratio_to_none_repeats"] = ratios
    row["mean_running_requests_repeats"] = [v["mean_running_requests"] for v in values]
    return row


def schedule_against_fixed(runs: list[dict]) -> list[dict]:
    """At each concurrency: the load-adaptive ViSpec set-up against the best fixed-K ViSpec set-up
    (highest median output tokens/s), as the ratio of medians, and its worst repeat against no
    speculation; also, against each fixed K, the median (min, max) of the per-repeat ratios (the
    set-ups take turns within a repeat, so these pair runs made under the same machine load).
    Empty without an adaptive row and a fixed one."""
    checks = []
    for concurrency in sorted({r["concurrency"] for r in runs}):
        rows = [r for r in runs if r["concurrency"] == concurrency]
        adaptive = [r for r in rows if setup_name(r) == "vispec"]
        fixed = [r for r in rows if setup_name(r).startswith("vispec-fixed")]
        if not adaptive or not fixed:
            continue
        best = max(fixed, key=lambda r: r["output_tok_s"])
        checks.append({"concurrency": concurrency, "best_fixed": setup_name(best),
                       "best_fixed_tok_s": best["output_tok_s"], "adaptive_tok_s": adaptive[0]["output_tok_s"],
                       "adaptive_to_best_fixed": adaptive[0]["output_tok_s"] / best["output_tok_s"],
                       "adaptive_to_none_min": adaptive[0]["ratio_to_none_min"],
                       "adaptive_to_fixed_paired": {
                           setup_name(row): spread_fields("ratio", [a / f for a, f in zip(
                               adaptive[0]["output_tok_s_repeats"], row["output_tok_s_repeats"], strict=True)])
                           for row in fixed if row.get("output_tok_s_repeats")}})
    return checks


def error_bar(rows: list[dict], field: str) -> list[list[float]]:
    return [[r[field] - r[f"{field}_min"] for r in rows], [r[f"{field}_max"] - r[field] for r in rows]]


def plot(report: dict, path: Path) -> None:
    """Output tokens/s and ratio to no speculation (median, min-max bars), mean acceptance length,
    TTFT p50, ITL p50 (solid) and p99 (dashed) and the engine's mean batch, per set-up against
    concurrency."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    throughput, ratio, acceptance, ttft, itl, batch = axes.flat
    names = list(dict.fromkeys(setup_name(r) for r in report["runs"]))
    for index, name in enumerate(names):
        rows = sorted((r for r in report["runs"] if setup_name(r) == name), key=lambda r: r["concurrency"])
        concurrency = [r["concurrency"] for r in rows]
        # Error bars side by side: each set-up's points shifted a little along the (log) axis.
        shift = 2 ** (0.05 * (index - (len(names) - 1) / 2))
        line = throughput.errorbar([c * shift for c in concurrency], [r["output_tok_s"] for r in rows],
                                   yerr=error_bar(rows, "output_tok_s"), fmt="-o", ms=3, capsize=3, label=name)
        colour = line.lines[0].get_color()
        ttft.plot(concurrency, [r["ttft_ms_p50"] for r in rows], "-o", ms=3, color=colour, label=name)
        itl.plot(concurrency, [r["itl_ms_p50"] for r in rows], "-o", ms=3, color=colour, label=f"{name} p50")
        itl.plot(concurrency, [r["itl_ms_p99"] for r in rows], "--", color=colour, label=f"{name} p99")
        batch.plot(concurrency, [r["mean_running_requests"] for r in rows], "-o", ms=3, color=colour, label=name)
        paired = [r for r in rows if r["ratio_to_none"] is not None]
        if paired:
            ratio.errorbar([r["concurrency"] * shift for r in paired], [r["ratio_to_none"] for r in paired],
                           yerr=error_bar(paired, "ratio_to_none"), fmt="-o", ms=3, capsize=3, color=colour, label=name)
        if name != "none":
            acceptance.plot(concurrency, [r["mean_acceptance_length"] for r in rows], "-o", ms=3, color=colour,
                            label=name)
    for ax, label in ((throughput, "output tokens/s (median, min-max)"),
                      (ratio, "ratio to no speculation (median, min-max)"), (acceptance, "mean acceptance length"),
                      (ttft, "TTFT p50 (ms)"), (itl, "ITL (ms)"), (batch, "engine's mean running requests")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ratio.axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(f"{report['target']} + {report['draft']}, {report['repeats']} interleaved repeats "
                 f"({report['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def estimate_duration_s(args: argparse.Namespace, runs: list[str], previous: Path) -> tuple[float, str]:
    """Seconds a run with these arguments should take on this machine, and what the estimate rests
    on: start-up and warm-up, then each benchmark call as long as the same set-up and concurrency
    took in `previous` (a results file; else FALLBACK_TOK_S for the answers' tokens), plus a fixed
    overhead per call."""
    earlier, basis = {}, set()
    if previous.exists():
        for row in json.loads(previous.read_text())["runs"]:
            earlier[(setup_name(row), row["concurrency"])] = row
    seconds = STARTUP_S + len(runs) * (CALL_OVERHEAD_S + args.warmup_prompts * args.output_len / FALLBACK_TOK_S)
    for concurrency in args.concurrency:
        prompts = num_prompts(args.prompts_per_concurrency, concurrency, args.min_prompts)
        for name in runs:
            row = earlier.get((name, concurrency))
            if row is not None and row.get("num_prompts"):
                call_s = row["wall_s"] * prompts / row["num_prompts"]
                basis.add(f"the durations in {previous.name}")
            elif row is not None:  # an older file: 4 prompts per concurrency, repeated images
                call_s = row["duration_s"] * prompts / num_prompts(4, concurrency) + CALL_OVERHEAD_S
                basis.add(f"the durations in {previous.name}, whose repeated images hit the prefix cache "
                          "(expect longer)")
            else:
                call_s = prompts * args.output_len / FALLBACK_TOK_S + CALL_OVERHEAD_S
                basis.add(f"an assumed {FALLBACK_TOK_S:.0f} output tokens/s")
            seconds += args.repeats * call_s
    return seconds, "; ".join(sorted(basis))


def main() -> None:
    from vispec_vllm.demo.models import DEFAULT_IMAGE_TOKENS, DEMO_PAIRS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS, choices=sorted(DEMO_PAIRS),
                        help="which shipped demo pair (and its scenes) unless --target etc. are given")
    parser.add_argument("--target", type=Path)
    parser.add_argument("--vispec", type=Path)
    parser.add_argument("--eagle", help="plain EAGLE draft ('' for none)")
    parser.add_argument("--num-speculative-tokens", type=int, default=5,
                        help="the most draft tokens a load-adaptive ViSpec step proposes")
    parser.add_argument("--fixed-ks", type=int, nargs="+", default=[3],
                        help="a ViSpec server drafting this many tokens every step, for each K given")
    parser.add_argument("--eagle-k", type=int, default=3, help="draft tokens of the EAGLE-style server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--prompts-per-concurrency", type=int, default=4,
                        help="requests per run = this x concurrency (at least 4 x this)")
    parser.add_argument("--min-prompts", type=int, help="requests per run at least (default: 4 x "
                        "--prompts-per-concurrency)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per set-up and concurrency")
    parser.add_argument("--warmup-prompts", type=int, default=8, help="requests of each server's warm-up run")
    parser.add_argument("--seed", type=int, default=0, help="picks the held-out scenes (disjoint per seed)")
    parser.add_argument("--runs", nargs="+", default=list(SETUP_NAMES), choices=SETUP_NAMES,
                        help="server set-ups to measure (vispec: load-adaptive; vispec-fixed: each K of --fixed-ks)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"one quick setting for tests: {', '.join(f'{k}={v}' for k, v in SMOKE.items())}")
    parser.add_argument("--estimate-only", action="store_true", help="print the estimated duration and exit")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_concurrency.json")
    parser.add_argument("--server-logs", type=Path,
                        help="keep each server's log here (<set-up>.log; default: a temporary folder)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    pair_target, pair_drafts = DEMO_PAIRS[args.image_tokens]
    args.target = args.target or pair_target
    args.vispec = args.vispec or pair_drafts["vispec"]
    args.eagle = str(pair_drafts["eagle"]) if args.eagle is None else args.eagle

    k = args.num_speculative_tokens
    server_setups = speculation_setups(args.vispec, args.eagle, k, args.fixed_ks, args.eagle_k)
    runs = [name for name in server_setups
            if ("vispec-fixed" if name.startswith("vispec-fixed-") else name) in args.runs
            and (name != "eagle" or args.eagle)]
    estimate, basis = estimate_duration_s(args, runs, args.out)
    print(f"estimated duration: about {format_duration(estimate)} ({len(runs)} set-ups x "
          f"{len(args.concurrency)} concurrencies x {args.repeats} repeats; from {basis})", flush=True)
    if args.estimate_only:
        return

    report = {"machine": machine_description(), "target": args.target.name, "draft": args.vispec.name,
              "image_tokens": args.image_tokens,
              "num_speculative_tokens": {name: server_setups[name].k for name in runs if name != "none"},
              "repeats": args.repeats, "output_len": args.output_len,
              "seed": args.seed,
              "prompts": "one held-out scene image + the describe prompt per request, unique per request and per "
                         "repeat (the same across set-ups within a repeat); prefix caching on (vLLM's default), "
                         "no hits past the chat template's first tokens; ready-check request skipped",
              "method": "servers side by side, set-ups take turns within each repeat (order rotated per repeat); "
                        f"one warm-up run of {args.warmup_prompts} requests per server first; rows: median over "
                        "repeats (min, max); ratio_to_none: median (min, max) of per-repeat ratios; "
                        "mean_running_requests: gauge sampled every 0.1 s from the first to the last sample with "
                        "a running request, zeros included",
              "runs": []}
    started = time.monotonic()

    def summarise(results: dict[tuple[str, int], list[dict]]) -> dict:
        summary = dict(report, runs=[])
        for name in runs:
            setup = server_setups[name]
            for concurrency in args.concurrency:
                summary["runs"].append(summary_row(
                    setup.mode, setup.adaptive, setup.k, concurrency,
                    num_prompts(args.prompts_per_concurrency, concurrency, args.min_prompts),
                    results[(name, concurrency)], results.get(("none", concurrency))))
        # The schedule's goal: at least 0.95x the best fixed K (medians), and never below no speculation.
        summary["schedule_against_fixed"] = schedule_against_fixed(summary["runs"])
        summary["duration_s"] = round(time.monotonic() - started, 1)
        return summary

    partial = args.out.with_suffix(".partial.json")

    def keep_repeats_done(results: dict[tuple[str, int], list[dict]], repeats_done: int) -> None:
        """A long run killed part-way (a session's end, a timeout) keeps the repeats it finished."""
        if repeats_done < args.repeats:
            write_json(summarise(results) | {"repeats": repeats_done, "repeats_planned": args.repeats}, partial)

    results = run_interleaved(args, {name: (SERVER_ARGS + server_setups[name].serve_args, server_setups[name].env)
                                     for name in runs}, started, keep_repeats_done)
    report = summarise(results)
    print(f"took {format_duration(report['duration_s'])} (estimated {format_duration(estimate)})")
    write_report(report, args.out, plot)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

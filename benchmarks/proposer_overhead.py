"""Host time of the ViSpec proposer per engine step, the draft network left out, at running batch
1, 8, 32 and 64, for two versions of the plugin's code: "before" (a git commit, checked out as a
worktree) and "after" (this checkout, uncommitted changes included).

    python benchmarks/proposer_overhead.py                       # before = f7cf820, after = this tree
    python benchmarks/proposer_overhead.py --batch-sizes 1 8 --repeats 1    # a reduced run
    python benchmarks/proposer_overhead.py --smoke --target DIR --draft DIR # tests: this tree, a few steps

How it measures:
- In-process vLLM (`LLM`, float32, eager, prefix caching off) on the demo pair (or --target/--draft),
  ViSpec at a fixed K (VISPEC_VLLM_ADAPTIVE=0 in the measuring process's environment).
- Timers wrap the proposer's `propose` and the draft network's entry points (the draft model's
  `forward`, `compress_image` (the vision adaptor) and `embed_input_ids`, and the proposer's
  `_sample_draft_tokens`: LM head + argmax). Host time per step = propose - draft network. Also
  reported: the same over vLLM's whole drafting call (`propose_draft_token_ids`, which adds vLLM's
  own input preparation around `propose`). Wall time: the CPU backend has no asynchronous work.
- Running batch N: requests are topped up after every engine step so that N stay unfinished; every
  step whose batch is N counts, after `--warmup-steps` of them. Requests alternate between a
  held-out scene image + the describe prompt and a text-only prompt (the same list, in the same
  order, for every version and repeat), so steps mix decode rows with prefill rows of new requests.
  Steps are split into those with prefill rows (a request's query longer than K+1) and pure decode.
- Each version is measured in its own child process whose PYTHONPATH puts that version's tree
  first; the child checks that every `vispec_vllm` module it loaded comes from that tree. Versions
  alternate (before, after, after, before, ...) over `--repeats`.

Writes benchmarks/results/proposer_overhead.json: the machine, each version's commit and content
digest, and per version, batch and step kind the median and p90 host ms (median over repeats, with
min and max), plus the after/before ratio of the medians paired by repeat.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import inspect
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    CHECKOUT,
    RESULTS,
    TEXT_PROMPTS,
    describe_prompt,
    ensure_worktree,
    format_duration,
    git,
    held_out_scene_seed,
    machine_description,
    percentile,
    spread_fields,
    write_json,
    write_scene_images,
)

THIS_TREE = CHECKOUT
BEFORE_COMMIT = "f7cf820"
BEFORE_TREE = Path("/tmp/vispec-before")
VERSIONS = ("before", "after")
STEP_KINDS = ("all", "prefill", "decode")
DEFAULTS = {"batch_sizes": [1, 8, 32, 64], "steps": 50, "warmup_steps": 10, "repeats": 3}
SMOKE = {"versions": ["after"], "batch_sizes": [2], "steps": 4, "warmup_steps": 1, "repeats": 1, "max_tokens": 16,
         "num_prompts": 16}


# --------------------------------------------------------------------------------------------
# The measuring child (one version of the plugin, one process)


class StepTimers:
    """Wall-clock timers around the proposer and the draft network; one record per drafting step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._network_depth = 0  # nested draft-network calls count once
        self._network_s = 0.0
        self._adaptor_s = 0.0
        self._proposed: dict | None = None

    def network(self, original, adaptor: bool = False):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            if self._network_depth:
                return original(*args, **kwargs)
            self._network_depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self._network_depth -= 1
                self._network_s += elapsed
                if adaptor:
                    self._adaptor_s += elapsed

        return timed

    def propose(self, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def timed(proposer, *args, **kwargs):
            arguments = signature.bind(proposer, *args, **kwargs).arguments
            step = self._describe_step(proposer, arguments["common_attn_metadata"],
                                       arguments["num_speculative_tokens"])
            self._network_s = self._adaptor_s = 0.0
            start = time.perf_counter()
            try:
                return original(proposer, *args, **kwargs)
            finally:
                step["propose_ms"] = (time.perf_counter() - start) * 1e3
                step["draft_network_ms"] = self._network_s * 1e3
                step["adaptor_ms"] = self._adaptor_s * 1e3
                self.steps.append(step)
                self._proposed = step

        return timed

    def drafting(self, original):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._proposed = None
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self._proposed is not None:
                    self._proposed["drafting_ms"] = (time.perf_counter() - start) * 1e3

        return timed

    @staticmethod
    def _describe_step(proposer, common_attn_metadata, num_speculative_tokens: int) -> dict:
        num_reqs = common_attn_metadata.num_reqs
        starts = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
        query_lens = [hi - lo for lo, hi in zip(starts, starts[1:], strict=False)]
        runner = getattr(proposer, "runner", None)
        image_reqs = None
        if runner is not None:
            requests = [runner.requests.get(r) for r in runner.input_batch.req_ids[:num_reqs]]
            image_reqs = sum(bool(r is not None and r.mm_features) for r in requests)
        return {"num_reqs": num_reqs, "query_tokens": starts[-1], "image_reqs": image_reqs,
                "prefill_reqs": sum(n > num_speculative_tokens + 1 for n in query_lens)}


def install_timers(timers: StepTimers) -> list[str]:
    """Wrap the methods (class attributes, so every instance vLLM builds is timed); returns their names."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vispec_vllm.draft_model import ViSpecDraftModel
    from vispec_vllm.proposer import ViSpecProposer

    wrapped = []
    ViSpecProposer.propose = timers.propose(ViSpecProposer.propose)
    wrapped.append("ViSpecProposer.propose")
    GPUModelRunner.propose_draft_token_ids = timers.drafting(GPUModelRunner.propose_draft_token_ids)
    wrapped.append("GPUModelRunner.propose_draft_token_ids")
    ViSpecProposer._sample_draft_tokens = timers.network(ViSpecProposer._sample_draft_tokens)
    wrapped.append("ViSpecProposer._sample_draft_tokens")
    for name in ("forward", "embed_input_ids", "compress_image"):
        if hasattr(ViSpecDraftModel, name):
            setattr(ViSpecDraftModel, name, timers.network(getattr(ViSpecDraftModel, name),
                                                           adaptor=name == "compress_image"))
            wrapped.append(f"ViSpecDraftModel.{name}")
    return wrapped


def plugin_modules(tree: Path) -> dict[str, str]:
    """Every loaded `vispec_vllm` module and its file; fails if one lies outside `tree`."""
    root = tree.resolve()
    modules = {name: getattr(module, "__file__", None) for name, module in sorted(sys.modules.items())
               if name == "vispec_vllm" or name.startswith("vispec_vllm.")}
    strays = {name: path for name, path in modules.items()
              if path is not None and not Path(path).resolve().is_relative_to(root)}
    if strays:
        raise RuntimeError(f"modules outside {root}: {strays}")
    return {name: path for name, path in modules.items() if path is not None}


def conversation(prompt: dict) -> list[dict]:
    from PIL import Image

    if prompt["image"] is None:
        return [{"role": "user", "content": prompt["text"]}]
    image = Image.open(prompt["image"]).convert("RGB")
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": prompt["text"]}]}]


def run_at_batch(llm, next_prompt, sampling, timers: StepTimers, batch: int, warmup_steps: int, steps: int) -> dict:
    """Keep `batch` requests unfinished, step the engine until `warmup_steps + steps` drafting steps
    ran at that batch, then let the requests finish. Returns the counted steps' records."""
    engine = llm.llm_engine
    first, engine_steps, started = len(timers.steps), 0, time.monotonic()
    max_engine_steps = 20 * (warmup_steps + steps) + 200
    while True:
        while engine.get_num_unfinished_requests() < batch:
            llm.enqueue_chat(next_prompt(), sampling, use_tqdm=False)
        engine.step()
        engine_steps += 1
        at_batch = [s for s in timers.steps[first:] if s["num_reqs"] == batch]
        if len(at_batch) >= warmup_steps + steps:
            break
        if engine_steps > max_engine_steps:
            if len(timers.steps) == first:
                raise RuntimeError("the ViSpec proposer never ran: is the draft a ViSpec checkpoint?")
            raise RuntimeError(f"only {len(at_batch)} of {warmup_steps + steps} drafting steps ran at batch {batch} "
                               f"in {engine_steps} engine steps")
    while engine.has_unfinished_requests():
        engine.step()
        engine_steps += 1
    return {"steps": at_batch[warmup_steps:], "engine_steps": engine_steps, "wall_s": time.monotonic() - started}


def child_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    tree = Path(spec["tree"])
    entry_modules = {name: importlib.import_module(name).__file__
                     for name in ("vispec_vllm", "vispec_vllm.patches", "vispec_vllm.proposer")}
    print(json.dumps(entry_modules), flush=True)
    plugin_modules(tree)
    timers = StepTimers()
    wrapped = install_timers(timers)

    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["target"], dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_seqs=max(spec["batch_sizes"]), seed=0, distributed_executor_backend="uni",
              limit_mm_per_prompt={"image": 1}, block_size=32, enable_prefix_caching=False,
              speculative_config={"model": spec["draft"], "num_speculative_tokens": spec["k"]})
    prompts = json.loads(Path(spec["prompts"]).read_text())
    served = itertools.count()

    def next_prompt() -> list[dict]:
        return conversation(prompts[next(served) % len(prompts)])

    sampling = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    report = {"tree": str(tree), "entry_modules": entry_modules, "wrapped": wrapped, "batches": {}}
    try:
        # Warm-up: first calls of every code path (image and text, prefill and decode).
        run_at_batch(llm, next_prompt, sampling, timers, min(4, max(spec["batch_sizes"])), 0,
                     spec["warmup_steps"] + 4)
        for batch in spec["batch_sizes"]:
            report["batches"][str(batch)] = run_at_batch(llm, next_prompt, sampling, timers, batch,
                                                         spec["warmup_steps"], spec["steps"])
            print(f"batch {batch}: {len(report['batches'][str(batch)]['steps'])} steps", flush=True)
        report["modules"] = plugin_modules(tree)  # again, now that the engine has imported what it needs
    finally:
        llm.llm_engine.engine_core.shutdown()
    Path(spec["out"]).write_text(json.dumps(report) + "\n")


# --------------------------------------------------------------------------------------------
# The parent: versions, prompts, child processes, summary


def version_info(tree: Path) -> dict:
    """Commit, whether the plugin's sources differ from it, and a digest of their contents."""
    digest = hashlib.sha256()
    files = sorted(p for d in ("vispec_vllm", "patches") for p in (tree / d).rglob("*.py")
                   if not p.relative_to(tree).as_posix().startswith("vispec_vllm/patches/"))
    for path in files:
        digest.update(path.relative_to(tree).as_posix().encode() + b"\0" + path.read_bytes())
    changed = [line for line in git(tree, "status", "--porcelain", "--", "vispec_vllm", "patches").splitlines()
               if line[3:] != "vispec_vllm/patches"]  # ensure_worktree's link
    return {"tree": str(tree), "commit": git(tree, "rev-parse", "HEAD"), "uncommitted_changes": bool(changed),
            "sources_sha256": digest.hexdigest(),
            "proposer_sha256": hashlib.sha256((tree / "vispec_vllm/proposer.py").read_bytes()).hexdigest(),
            "draft_model_sha256": hashlib.sha256((tree / "vispec_vllm/draft_model.py").read_bytes()).hexdigest()}


def write_prompts(directory: Path, count: int, seed: int) -> Path:
    """`count` prompts, alternating held-out scene image + describe prompt and text only."""
    images = write_scene_images(directory / "images", [held_out_scene_seed(i, seed) for i in range(count // 2)])
    prompts = []
    for i in range(count):
        if i % 2 == 0:
            prompts.append({"image": str(images[i // 2]), "text": describe_prompt()})
        else:
            prompts.append({"image": None, "text": TEXT_PROMPTS[(i // 2) % len(TEXT_PROMPTS)]})
    path = directory / "prompts.json"
    path.write_text(json.dumps(prompts) + "\n")
    return path


def run_child(tree: Path, spec: dict, work: Path, name: str) -> dict:
    spec_path, out, log = work / f"{name}.spec.json", work / f"{name}.json", work / f"{name}.log"
    spec_path.write_text(json.dumps({**spec, "tree": str(tree), "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VISPEC_VLLM_ADAPTIVE": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    started = time.monotonic()
    with open(log, "w") as log_file:
        result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, timeout=3600)
    if result.returncode != 0:
        print(log.read_text()[-6000:], file=sys.stderr)
        raise RuntimeError(f"{name}: the measuring process failed (exit {result.returncode})")
    report = json.loads(out.read_text())
    report["process_wall_s"] = time.monotonic() - started
    return report


def host_ms(step: dict) -> float:
    return step["propose_ms"] - step["draft_network_ms"]


def drafting_host_ms(step: dict) -> float | None:
    return step["drafting_ms"] - step["draft_network_ms"] if "drafting_ms" in step else None


def of_kind(steps: list[dict], kind: str) -> list[dict]:
    if kind == "prefill":
        return [s for s in steps if s["prefill_reqs"]]
    if kind == "decode":
        return [s for s in steps if not s["prefill_reqs"]]
    return steps


def per_repeat(steps: list[dict]) -> dict | None:
    """One repeat's numbers for one version, batch and step kind."""
    if not steps:
        return None
    host = [host_ms(s) for s in steps]
    drafting = [d for d in map(drafting_host_ms, steps) if d is not None]
    return {"num_steps": len(steps), "host_ms_median": statistics.median(host), "host_ms_p90": percentile(host, 0.9),
            "drafting_host_ms_median": statistics.median(drafting) if drafting else None,
            "drafting_host_ms_p90": percentile(drafting, 0.9) if drafting else None,
            "propose_ms_median": statistics.median(s["propose_ms"] for s in steps),
            "draft_network_ms_median": statistics.median(s["draft_network_ms"] for s in steps),
            "adaptor_ms_median": statistics.median(s["adaptor_ms"] for s in steps),
            "image_request_share": (sum(s["image_reqs"] or 0 for s in steps) / sum(s["num_reqs"] for s in steps)),
            "prefill_request_share": sum(s["prefill_reqs"] for s in steps) / sum(s["num_reqs"] for s in steps)}


def summarise(children: dict[str, list[dict]], batch_sizes: list[int]) -> tuple[list[dict], list[dict]]:
    """Rows per version, batch and step kind (median over repeats, min, max), and the after/before
    ratios of host ms per batch and step kind, paired by repeat."""
    rows, by_key = [], {}
    for version, reports in children.items():
        for batch in batch_sizes:
            for kind in STEP_KINDS:
                repeats = [per_repeat(of_kind(r["batches"][str(batch)]["steps"], kind)) for r in reports]
                present = [r for r in repeats if r is not None]
                row = {"version": version, "batch": batch, "steps": kind, "repeats": len(present),
                       "num_steps": [r["num_steps"] if r else 0 for r in repeats]}
                for field in ("host_ms_median", "host_ms_p90", "drafting_host_ms_median", "drafting_host_ms_p90",
                              "propose_ms_median", "draft_network_ms_median", "adaptor_ms_median"):
                    row |= spread_fields(field, [r[field] for r in present])
                for field in ("image_request_share", "prefill_request_share"):
                    row[field] = statistics.median(r[field] for r in present) if present else None
                rows.append(row)
                by_key[(version, batch, kind)] = repeats
    comparison = []
    if set(children) == set(VERSIONS):
        for batch in batch_sizes:
            for kind in STEP_KINDS:
                pairs = zip(by_key[("before", batch, kind)], by_key[("after", batch, kind)], strict=True)
                ratios = [after["host_ms_median"] / before["host_ms_median"] for before, after in pairs
                          if before and after and before["host_ms_median"] > 0]
                comparison.append({"batch": batch, "steps": kind,
                                   **spread_fields("host_ms_median_after_over_before", ratios)})
    return rows, comparison


def estimate_full_run_s(children: dict[str, list[dict]], steps_per_batch: int) -> float:
    """Seconds the default run (DEFAULTS, both versions) should take, from this run's children:
    start-up per process, and per batch size the wall time per counted step, linear in the batch
    (fitted to the batch sizes measured here)."""
    reports = [r for rs in children.values() for r in rs]
    startup = statistics.median(r["process_wall_s"] - r["measured_s"] for r in reports)  # and shut-down
    points = {}
    for report in reports:
        for batch, measured in report["batches"].items():
            points.setdefault(int(batch), []).append(measured["wall_s"] / steps_per_batch)
    xs = sorted(points)
    ys = [statistics.median(points[x]) for x in xs]
    if len(xs) == 1:
        slope, intercept = ys[0] / (xs[0] + 8), ys[0] * 8 / (xs[0] + 8)  # one point: assume a + b/8 scaling
    else:
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2
                                                                                           for x in xs)
        slope = max(slope, 0.0)
        intercept = max(mean_y - slope * mean_x, 0.0)
    per_process = startup + sum((intercept + slope * b) * (DEFAULTS["warmup_steps"] + DEFAULTS["steps"])
                                for b in DEFAULTS["batch_sizes"])
    return DEFAULTS["repeats"] * len(VERSIONS) * per_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, help="default: the shipped demo target")
    parser.add_argument("--draft", type=Path, help="a ViSpec draft of the target; default: the demo pair's")
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS)
    parser.add_argument("--before-commit", default=BEFORE_COMMIT)
    parser.add_argument("--before-tree", type=Path, default=BEFORE_TREE,
                        help="worktree of --before-commit (made if missing)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=DEFAULTS["batch_sizes"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="counted drafting steps per batch size")
    parser.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"],
                        help="drafting steps at each batch size before counting")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="child processes per version")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=512, help="distinct prompts (then reused in turn)")
    parser.add_argument("--seed", type=int, default=0, help="picks the held-out scenes")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a quick run for tests: {', '.join(f'{k}={v}' for k, v in SMOKE.items())}")
    parser.add_argument("--out", type=Path, default=RESULTS / "proposer_overhead.json")
    args = parser.parse_args()
    if args.child:  # the measuring process: its plugin may be another version, without vispec_vllm.demo
        child_main(args.child)
        return
    if args.smoke:
        vars(args).update(SMOKE)
    from vispec_vllm.demo.models import DEMO_DRAFTS, DEMO_TARGET

    args.target = args.target or DEMO_TARGET
    args.draft = args.draft or DEMO_DRAFTS["vispec"]

    trees = {"before": args.before_tree.resolve(), "after": THIS_TREE}
    if "before" in args.versions:
        ensure_worktree(args.before_tree, args.before_commit)
    versions = {name: version_info(trees[name]) for name in args.versions}
    spec = {"target": str(args.target.resolve()), "draft": str(args.draft.resolve()), "k": args.num_speculative_tokens,
            "batch_sizes": args.batch_sizes, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "max_tokens": args.max_tokens}
    children: dict[str, list[dict]] = {name: [] for name in args.versions}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec["prompts"] = str(write_prompts(work, args.num_prompts, args.seed))
        for repeat in range(args.repeats):
            # Alternate which version goes first, so drift in the machine's speed hits both alike.
            order = args.versions if repeat % 2 == 0 else args.versions[::-1]
            for name in order:
                report = run_child(trees[name], spec, work, f"{name}-{repeat}")
                report["measured_s"] = sum(b["wall_s"] for b in report["batches"].values())
                children[name].append(report)
                versions[name]["modules"] = report["modules"]
                versions[name]["timed_methods"] = report["wrapped"]
                print(f"{name} ({trees[name]}): {report['entry_modules']}", flush=True)
                summary = ", ".join(f"batch {b}: host {statistics.median(map(host_ms, m['steps'])):.2f} ms"
                                    for b, m in report["batches"].items())
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {summary} "
                      f"({format_duration(time.monotonic() - started)} elapsed)", flush=True)
    rows, comparison = summarise(children, args.batch_sizes)
    report = {"machine": machine_description(), "target": args.target.name, "draft": args.draft.name,
              "num_speculative_tokens": args.num_speculative_tokens, "dtype": "float32",
              "method": "in-process vLLM LLM, eager, prefix caching off, fixed K (VISPEC_VLLM_ADAPTIVE=0); host ms = "
                        "ViSpecProposer.propose wall time minus the draft network (draft model forward, "
                        "compress_image, embed_input_ids; _sample_draft_tokens); drafting_host_ms: the same over "
                        "the model runner's propose_draft_token_ids; running batch kept at N by topping up "
                        "requests (alternating held-out scene image + describe prompt, and text only); steps with "
                        "prefill rows: a request's query longer than K+1; per repeat median and p90 over steps, "
                        "then median (min, max) over repeats",
              "batch_sizes": args.batch_sizes, "steps_per_batch": args.steps, "warmup_steps": args.warmup_steps,
              "repeats": args.repeats, "max_tokens": args.max_tokens, "versions": versions, "rows": rows,
              "comparison": comparison, "duration_s": round(time.monotonic() - started, 1)}
    write_json(report, args.out)
    for row in rows:
        if row["host_ms_median"] is not None:
            print(f"{row['version']:6s} batch {row['batch']:3d} {row['steps']:7s}: host ms median "
                  f"{row['host_ms_median']:.3f} [{row['host_ms_median_min']:.3f}, {row['host_ms_median_max']:.3f}], "
                  f"p90 {row['host_ms_p90']:.3f}, steps {row['num_steps']}")
    estimate = estimate_full_run_s(children, args.warmup_steps + args.steps)
    print(f"took {format_duration(report['duration_s'])}; the default full run ({DEFAULTS}, both versions) should "
          f"take about {format_duration(estimate)} at this run's speed")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

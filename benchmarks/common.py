"""What the benchmark scripts share: where results go, the machine's description, held-out prompts,
servers started side by side, summary statistics and the JSON + PNG writer. (A server's
`/metrics` text is read by `vispec_vllm.demo.server.metric_total`, the demo's parser.)

Importing this module does nothing but define names: no environment variable is set, and vLLM,
torch and the plugin's tooling are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CHECKOUT = Path(__file__).resolve().parent.parent

# Text-only requests beside the image ones (acceptance and proposer benchmarks).
TEXT_PROMPTS = [
    "Describe a picture with a red circle on the left and a blue square on the right.",
    "What shapes can appear in these pictures, and in which colours?",
    "Tell me about a large green triangle above a small yellow star.",
    "Count three purple circles and one orange square.",
]


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} (vLLM CPU backend)"


# --------------------------------------------------------------------------------------------
# Held-out scenes


def held_out_scene_seed(index: int, seed: int = 0) -> int:
    """Scene seed of held-out request `index`; a different `seed` gives a disjoint set of scenes."""
    from vispec_vllm.demo.scenes import HELD_OUT_START

    return HELD_OUT_START + seed * 100_000_000 + index


def scene_module(image_tokens: int = 36):
    """The synthetic scenes of the demo pair with `image_tokens` per image."""
    from vispec_vllm.demo.target import RECIPES

    return RECIPES[image_tokens].scenes


def write_scene_images(directory: Path, scene_seeds: Iterable[int], image_tokens: int = 36) -> list[Path]:
    """One PNG per scene seed (the synthetic scenes of the demo pair with `image_tokens` per image),
    named by seed."""
    scenes = scene_module(image_tokens)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for scene_seed in scene_seeds:
        path = directory / f"scene-{image_tokens}-{scene_seed}.png"
        if not path.exists():
            scenes.make_scene(scene_seed).image.save(path)
        paths.append(path)
    return paths


def describe_prompt(image_tokens: int = 36) -> str:
    return scene_module(image_tokens).DESCRIBE_PROMPT


def images_in(conversation: list[dict]) -> int:
    """How many images a chat prompt carries (its `image_pil` parts)."""
    return sum(part.get("type") == "image_pil" for message in conversation
               if isinstance(message["content"], list) for part in message["content"])


def image_limit(conversations: Iterable[list[dict]]) -> int:
    """vLLM's `limit_mm_per_prompt` image count for these chat prompts: the most any carries, at least 1."""
    return max([1, *map(images_in, conversations)])


# --------------------------------------------------------------------------------------------
# Servers


def start_servers(stack: contextlib.ExitStack, setups: dict[str, tuple[list[str], dict[str, str]]], model: Path,
                  log_dir: Path, startup_timeout_s: float = 600.0) -> dict:
    """`vllm serve` processes side by side, one per set-up (vispec_vllm.demo.server.start_side_by_side).
    SIGTERM (`timeout`, a session's end) then exits through `stack`, so the servers stop with the
    benchmark: by default Python dies on SIGTERM without running cleanups, and a killed 100-minute run
    left six servers holding 19 GiB of this machine's 24."""
    from vispec_vllm.demo.server import start_side_by_side

    def exit_through_cleanups(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_through_cleanups)
    return start_side_by_side(stack, setups, model, log_dir, startup_timeout_s=startup_timeout_s)


# --------------------------------------------------------------------------------------------
# Acceptance in an in-process engine


def spec_decode_counters(llm) -> tuple[float, float, list[float]]:
    """(drafts, accepted draft tokens, accepted draft tokens at each speculative position, position 1
    first) so far, from an in-process engine's metrics."""
    metrics = {m.name: m for m in llm.get_metrics()}

    def value(name: str) -> float:
        return getattr(metrics.get(name), "value", None) or 0.0

    per_position = getattr(metrics.get("vllm:spec_decode_num_accepted_tokens_per_pos"), "values", None) or []
    return (value("vllm:spec_decode_num_drafts"), value("vllm:spec_decode_num_accepted_tokens"),
            [float(v) for v in per_position])


def measure_acceptance_by_position(target: Path, draft: Path, method: str | None, k: int, prompts: dict[str, list],
                                   max_tokens: int) -> dict[str, tuple[float, list[float]]]:
    """For each kind of `prompts`: vLLM's mean acceptance length (1 + accepted/drafts) of `draft` at
    K=`k`, and the acceptance rate at each speculative position 1..K (accepted at the position /
    drafts), from vLLM's per-position counters; greedy, float32, in-process; the caller sets the
    in-process environment."""
    from vllm import LLM, SamplingParams

    spec = {"model": str(draft), "num_speculative_tokens": k, **({"method": method} if method else {})}
    images = image_limit(conversation for conversations in prompts.values() for conversation in conversations)
    llm = LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              distributed_executor_backend="uni", limit_mm_per_prompt={"image": images}, block_size=32,
              disable_log_stats=False, speculative_config=spec)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    result = {}
    try:
        for kind, conversations in prompts.items():
            drafts_before, accepted_before, per_position_before = spec_decode_counters(llm)
            llm.chat(conversations, sampling, use_tqdm=False)
            drafts, accepted, per_position = spec_decode_counters(llm)
            drafts, accepted = drafts - drafts_before, accepted - accepted_before
            per_position_before += [0.0] * (len(per_position) - len(per_position_before))
            result[kind] = (1.0 + accepted / drafts if drafts else 1.0,
                            [(after - before) / drafts if drafts else 0.0
                             for after, before in zip(per_position, per_position_before, strict=True)])
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return result


def measure_acceptance(target: Path, draft: Path, method: str | None, k: int, prompts: dict[str, list],
                       max_tokens: int) -> dict[str, float]:
    """vLLM's mean acceptance length (1 + accepted/drafts) of `draft` at K=`k` for each kind of
    `prompts`, greedy, float32, in-process; the caller sets the in-process environment."""
    return {kind: mean for kind, (mean, _) in measure_acceptance_by_position(
        target, draft, method, k, prompts, max_tokens).items()}


# --------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = q * (len(ordered) - 1)
    lo, hi = math.floor(position), math.ceil(position)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def spread(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """(min, median, max) of the values that exist; (None, None, None) when none do."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, None
    return min(present), statistics.median(present), max(present)


def spread_fields(name: str, values: Sequence[float | None]) -> dict:
    """{name: median, name_min: ..., name_max: ...} over repeats."""
    lo, median, hi = spread(values)
    return {name: median, f"{name}_min": lo, f"{name}_max": hi}


# --------------------------------------------------------------------------------------------
# Output


def write_json(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def write_report(report: dict, out: Path, plot_report: Callable[[dict, Path], None]) -> None:
    """The JSON at `out` and, beside it, the plot as PNG."""
    write_json(report, out)
    plot_report(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if minutes < 2 else f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


# --------------------------------------------------------------------------------------------
# Earlier versions of the plugin, for before/after measurements


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True, text=True).stdout.strip()


def ensure_worktree(tree: Path, commit: str) -> None:
    """A detached worktree of `commit` at `tree`, with `vispec_vllm/patches` linked to its top-level
    `patches/` (the editable install maps that package to this checkout's `patches/` otherwise)."""
    if not tree.exists():
        git(CHECKOUT, "worktree", "add", "--detach", str(tree), commit)
    head = git(tree, "rev-parse", "HEAD")
    if head != git(CHECKOUT, "rev-parse", commit):
        raise RuntimeError(f"{tree} is at {head}, not {commit}")
    link = tree / "vispec_vllm" / "patches"
    if not link.exists():
        link.symlink_to(tree / "patches")

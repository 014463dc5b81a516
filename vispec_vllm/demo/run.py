"""The main job (`vispec-vllm demo`, `bash scripts/demo.sh`): serve the shipped demo pair without
and with ViSpec speculation, on held-out scenes, one request at a time, and write what it measured.

It starts vLLM's OpenAI server on 127.0.0.1 twice (through `vispec-vllm serve`, so it works on
both vLLM builds), sends the same held-out scene images to each, and compares: identical outputs,
vLLM's mean acceptance length and the output tokens/s ratio. The numbers go to a JSON file
(default `benchmarks/results/demo.json`) so that the README can quote them.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path("benchmarks/results/demo.json")


@dataclass(frozen=True)
class DemoOptions:
    num_requests: int = 6
    max_tokens: int | None = None  # default: the target's longest reference answer
    num_speculative_tokens: int = 5
    image_tokens: int = 576  # which shipped pair: 576 (LLaVA-1.5 scale, the default) or 36
    out: Path = DEFAULT_OUT
    logs_dir: Path = Path.home() / ".cache" / "vispec-vllm"


def mean_acceptance_length(metrics_text: str) -> float | None:
    """vLLM's own definition: 1 + accepted draft tokens / drafts, from the Prometheus counters
    (summed over engines); None before any draft."""
    from vispec_vllm.demo.server import metric_total

    drafts = metric_total(metrics_text, "vllm:spec_decode_num_drafts_total")
    if not drafts:
        return None
    return 1.0 + metric_total(metrics_text, "vllm:spec_decode_num_accepted_tokens_total") / drafts


def machine_description() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def image_tokens_per_image(target_dir: Path) -> int:
    """LLaVA-1.5 layout: one token per vision patch."""
    vision = json.loads((target_dir / "config.json").read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def _run_requests(server, prompts: list[list[dict]], max_tokens: int) -> tuple[float, list[str]]:
    """Send prompts one at a time (concurrency 1); returns (output tokens per second, answers)."""
    answers, tokens, started = [], 0, time.monotonic()
    for content in prompts:
        status, body = server.chat(content, max_tokens=max_tokens)
        if status != 200:
            sys.exit(f"request failed with HTTP {status}: {body}")
        tokens += body["usage"]["completion_tokens"]
        answers.append(body["choices"][0]["message"]["content"])
    return tokens / (time.monotonic() - started), answers


def run_demo(options: DemoOptions) -> dict:
    from vispec_vllm.demo.models import DEMO_PAIRS
    from vispec_vllm.demo.server import VLLMServer, image_data_url
    from vispec_vllm.demo.target import RECIPES

    target, drafts = DEMO_PAIRS[options.image_tokens]
    draft = drafts["vispec"]
    recipe = RECIPES[options.image_tokens]
    max_tokens = options.max_tokens or recipe.max_new_tokens
    # Held-out prompts as the target was trained on them: a description request, or (rich scenes)
    # sometimes a comparison of two images.
    examples = [recipe.scenes.training_prompt(seed) for seed in recipe.scenes.held_out_seeds(options.num_requests)]
    prompts = []
    for scenes_, messages in examples:
        images = iter(scene.image for scene in scenes_)
        prompts.append([{"type": "image_url", "image_url": {"url": image_data_url(next(images))}}
                        if part == {"type": "image"} else part for part in messages[0]["content"]])
    common = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--limit-mm-per-prompt",
              '{"image": 2}']
    spec = {"model": str(draft), "num_speculative_tokens": options.num_speculative_tokens}
    options.logs_dir.mkdir(parents=True, exist_ok=True)
    print(f"Demo pair: target {target.name} (trained on synthetic scenes, {recipe.num_image_tokens} image tokens "
          f"per image), ViSpec draft {draft.name}, K up to {options.num_speculative_tokens} (load-adaptive); "
          f"{options.num_requests} held-out prompts, one request at a time.")
    results = {}
    for mode, extra in (("none", []), ("vispec", ["--speculative-config", json.dumps(spec)])):
        log = options.logs_dir / f"demo-server-{'vispec' if extra else 'plain'}.log"
        print(f"Starting vLLM on 127.0.0.1 with the vispec-vllm plugin, speculation: {mode} (log: {log}) ...",
              flush=True)
        with VLLMServer(target, common + extra, log_path=log) as server:
            _run_requests(server, prompts[:1], max_tokens)  # warm-up
            tok_s, answers = _run_requests(server, prompts, max_tokens)
            acceptance = mean_acceptance_length(server.metrics()) if extra else None
        results[mode] = (tok_s, answers, acceptance)
        print(f"  {mode}: {tok_s:.1f} output tokens/s", flush=True)
    (tok_s_none, answers_none, _), (tok_s_vispec, answers_vispec, acceptance) = results["none"], results["vispec"]
    report = {
        "machine": machine_description(),
        "target": target.name,
        "draft": draft.name,
        "image_tokens": image_tokens_per_image(target),
        "max_tokens": max_tokens,
        "k": options.num_speculative_tokens,
        "adaptive": os.environ.get("VISPEC_VLLM_ADAPTIVE", "1") != "0",
        "num_requests": options.num_requests,
        "outputs_identical": answers_none == answers_vispec,
        "mean_acceptance_length": acceptance,
        "tok_s_none": tok_s_none,
        "tok_s_vispec": tok_s_vispec,
        "speedup": tok_s_vispec / tok_s_none,
    }
    shown = next(i for i, (scenes_, _) in enumerate(examples) if len(scenes_) == 1)  # a one-image description
    scene = examples[shown][0][0]
    print(f"\nHeld-out scene {scene.seed}: {answers_vispec[shown]!r}")
    print(f"Reference description:   {scene.description!r}")
    print(f"Outputs identical with and without speculation: {report['outputs_identical']}")
    print(f"Mean acceptance length (vLLM's 1 + accepted/drafts): {acceptance:.2f}")
    print(f"Speed-up over no speculation on this machine: {report['speedup']:.2f}x "
          f"({tok_s_vispec:.1f} vs {tok_s_none:.1f} output tokens/s at concurrency 1)")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Written: {options.out}")
    return report

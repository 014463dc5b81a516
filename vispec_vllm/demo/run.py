"""The main job (`vispec-vllm demo`, `bash scripts/demo.sh`): serve the shipped demo pair without
and with ViSpec speculation, on held-out scenes, one request at a time, and write what it measured.

It starts two vLLM OpenAI servers on 127.0.0.1 side by side (through `vispec-vllm serve`, so it works
on both vLLM builds): one without speculation, one with the ViSpec draft. After a warm-up of each
(untimed requests on other held-out scenes, during which the ViSpec server's load-adaptive schedule
measures acceptance and step times and settles on its K), they take turns `repeats` times (the
order alternates), answering the same held-out prompts, so drift in a shared machine's speed hits
both alike. It reports identical outputs, vLLM's mean acceptance length, the output tokens/s ratio
of each repeat (median, min, max), and the two times that bound the speed-up: the target's step (no
speculation) and one draft forward. The numbers go to a JSON file (default
`benchmarks/results/demo.json`) so that the README can quote them.
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
    repeats: int = 3  # turns of each server, interleaved
    # Untimed requests to each server first, other held-out scenes: the ViSpec server's
    # load-adaptive schedule measures acceptance and step times and settles on its K meanwhile.
    warmup_requests: int = 6
    # Both servers under vLLM's default compilation (Dynamo + Inductor on CPU) instead of eager.
    compiled: bool = False
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


def _held_out_seeds(recipe, count: int) -> tuple[list[int], list[int]]:
    """(description seeds, comparison seeds) among the first `count` held-out seeds."""
    seeds = recipe.scenes.held_out_seeds(count)
    # Chosen by seed, so that only the prompts used draw their scenes.
    is_comparison = getattr(recipe.scenes, "is_comparison", lambda _seed: False)
    return [seed for seed in seeds if not is_comparison(seed)], [seed for seed in seeds if is_comparison(seed)]


def _timed_seeds(recipe, count: int) -> list[int]:
    one_image, two_images = _held_out_seeds(recipe, 8 * count)
    return one_image[: count - 1] + two_images[:1] if two_images and count > 1 else one_image[:count]


def held_out_prompts(recipe, count: int) -> list[tuple[list, list[dict]]]:
    """`count` held-out (scenes, messages) prompts as the target was trained on them: description
    requests and, where the scenes have them, one comparison of two images among them."""
    return [recipe.scenes.training_prompt(seed) for seed in _timed_seeds(recipe, count)]


def warmup_prompts(recipe, count: int, timed_count: int) -> list[tuple[list, list[dict]]]:
    """`count` other held-out description prompts: none is among `held_out_prompts(recipe,
    timed_count)`, so the timed prompts meet no cache that a warm-up on these filled."""
    timed = set(_timed_seeds(recipe, timed_count))
    one_image, _ = _held_out_seeds(recipe, 8 * (count + timed_count))
    return [recipe.scenes.training_prompt(seed) for seed in one_image if seed not in timed][:count]


def _chat_content(scenes_: list, messages: list[dict]) -> list[dict]:
    """The user turn's parts, each image placeholder replaced by its scene image as a data URL."""
    from vispec_vllm.demo.server import image_data_url

    images = iter(scene.image for scene in scenes_)
    return [{"type": "image_url", "image_url": {"url": image_data_url(next(images))}} if part == {"type": "image"}
            else part for part in messages[0]["content"]]


def target_step_ms(metrics_text: str) -> float | None:
    """Mean inter-token latency of a server without speculation: one target step per token."""
    from vispec_vllm.demo.server import metric_total

    count = metric_total(metrics_text, "vllm:inter_token_latency_seconds_count")
    return 1e3 * metric_total(metrics_text, "vllm:inter_token_latency_seconds_sum") / count if count else None


def draft_forward_ms(server_log: str) -> float | None:
    """The ViSpec server's last logged drafting time per draft forward (VISPEC_VLLM_TIME_DRAFT=1)."""
    from vispec_vllm.proposer_state import DRAFT_TIMING_PATTERN

    found = DRAFT_TIMING_PATTERN.findall(server_log)
    return float(found[-1][0]) if found and int(found[-1][1]) else None


def description_accuracy(scenes_module, examples: list[tuple[list, list[dict]]], answers: list[str]) -> dict | None:
    """How right the answers to the one-image description prompts are, object by object: named in
    the right cell (colour and shape) and fully right (size and number too), as
    benchmarks/description_accuracy.py counts them; None for a scene kind without per-object checks."""
    if not hasattr(scenes_module, "object_accuracy"):
        return None
    described = [(scenes_[0], answer) for (scenes_, _), answer in zip(examples, answers, strict=True)
                 if len(scenes_) == 1]
    counted = [scenes_module.object_accuracy(answer, scene.objects) for scene, answer in described]
    return {"descriptions": len(described),
            "objects": sum(len(scene.objects) for scene, _ in described),
            "objects_named_in_place": sum(accuracy.named_in_place for accuracy in counted),
            "objects_fully_right": sum(accuracy.fully_right for accuracy in counted)}


def run_demo(options: DemoOptions) -> dict:
    import contextlib
    import statistics

    from vispec_vllm.demo.models import DEMO_PAIRS
    from vispec_vllm.demo.server import start_side_by_side
    from vispec_vllm.demo.target import RECIPES
    from vispec_vllm.proposer_state import DRAFT_TIMING_ENV

    target, drafts = DEMO_PAIRS[options.image_tokens]
    draft = drafts["vispec"]
    recipe = RECIPES[options.image_tokens]
    max_tokens = options.max_tokens or recipe.max_new_tokens
    examples = held_out_prompts(recipe, options.num_requests)
    warmup_examples = warmup_prompts(recipe, options.warmup_requests, options.num_requests)
    prompts = [_chat_content(scenes_, messages) for scenes_, messages in examples]
    warmup_contents = [_chat_content(scenes_, messages) for scenes_, messages in warmup_examples]
    common = ["--dtype", "float32", *([] if options.compiled else ["--enforce-eager"]), "--max-model-len", "2048",
              "--limit-mm-per-prompt", '{"image": 2}']
    spec = {"model": str(draft), "num_speculative_tokens": options.num_speculative_tokens}
    # The ViSpec server times its drafting and logs it every 2 s (vispec_vllm/proposer_state.py).
    timing_env = {DRAFT_TIMING_ENV: "1", "VISPEC_VLLM_STATE_LOG_INTERVAL_S": "2"}
    setups = {"none": (common, {}), "vispec": (common + ["--speculative-config", json.dumps(spec)], timing_env)}
    options.logs_dir.mkdir(parents=True, exist_ok=True)
    print(f"Demo pair: target {target.name} (trained on synthetic scenes, {recipe.num_image_tokens} image tokens "
          f"per image), ViSpec draft {draft.name}, K up to {options.num_speculative_tokens} (load-adaptive); "
          f"{len(prompts)} held-out prompts, one request at a time, {options.repeats} interleaved repeats after a "
          f"warm-up; both servers {'compiled' if options.compiled else 'eager (--enforce-eager)'}.")
    print(f"Starting two vLLM servers on 127.0.0.1 with the vispec-vllm plugin, without and with speculation "
          f"(logs: {options.logs_dir}/demo-server-*.log) ...", flush=True)
    repeats, answers = [], {"none": [], "vispec": []}
    with contextlib.ExitStack() as stack:
        servers = start_side_by_side(stack, setups, target, options.logs_dir, "demo-server-")
        print(f"Warm-up: {len(warmup_contents)} other held-out prompts to each server (untimed) ...", flush=True)
        for server in servers.values():
            _run_requests(server, warmup_contents, max_tokens)
        for repeat in range(options.repeats):
            tok_s = {}
            for mode in (("none", "vispec") if repeat % 2 == 0 else ("vispec", "none")):
                tok_s[mode], mode_answers = _run_requests(servers[mode], prompts, max_tokens)
                answers[mode].append(mode_answers)
            repeats.append({"tok_s_none": tok_s["none"], "tok_s_vispec": tok_s["vispec"],
                            "speedup": tok_s["vispec"] / tok_s["none"]})
            print(f"  repeat {repeat + 1}: {tok_s['none']:.1f} output tokens/s without speculation, "
                  f"{tok_s['vispec']:.1f} with ViSpec: {repeats[-1]['speedup']:.2f}x", flush=True)
        acceptance = mean_acceptance_length(servers["vispec"].metrics())
        step_ms = target_step_ms(servers["none"].metrics())
        forward_ms = draft_forward_ms(servers["vispec"].log_path.read_text())
    speedups = [r["speedup"] for r in repeats]
    reference_answers = answers["none"][0]
    report = {
        "machine": machine_description(),
        "target": target.name,
        "draft": draft.name,
        "image_tokens": image_tokens_per_image(target),
        "max_tokens": max_tokens,
        "k": options.num_speculative_tokens,
        "adaptive": os.environ.get("VISPEC_VLLM_ADAPTIVE", "1") != "0",
        "mode": "compiled" if options.compiled else "eager",
        "num_requests": len(prompts),
        "warmup_requests": len(warmup_contents),
        "outputs_identical": all(run == reference_answers for mode in answers.values() for run in mode),
        "mean_acceptance_length": acceptance,
        "tok_s_none": statistics.median(r["tok_s_none"] for r in repeats),
        "tok_s_vispec": statistics.median(r["tok_s_vispec"] for r in repeats),
        "speedup": statistics.median(speedups),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "repeats": repeats,
        "target_step_ms": step_ms,
        "target_step_measured_by": "mean inter-token latency of the server without speculation "
                                   "(vllm:inter_token_latency_seconds sum / count), concurrency 1",
        "draft_forward_ms": forward_ms,
        "draft_forward_measured_by": "the ViSpec server's drafting wall time per draft forward on decode "
                                     "steps (VISPEC_VLLM_TIME_DRAFT=1: every propose() call of a decode step "
                                     "timed, divided by the K forwards it makes; row buffers, LM head, argmax "
                                     "and vLLM's chain bookkeeping included), concurrency 1",
        "cost_ratio": forward_ms / step_ms if forward_ms and step_ms else None,
        # How right the target's answers are (the same with and without speculation when identical).
        "answer_accuracy": description_accuracy(recipe.scenes, examples, reference_answers),
    }
    shown = next(i for i, (scenes_, _) in enumerate(examples) if len(scenes_) == 1)  # a one-image description
    scene = examples[shown][0][0]
    print(f"\nHeld-out scene {scene.seed}: {answers['vispec'][0][shown]!r}")
    print(f"Reference description:   {scene.description!r}")
    shown_accuracy = description_accuracy(recipe.scenes, [examples[shown]], [answers["vispec"][0][shown]])
    if shown_accuracy is not None:
        accuracy = report["answer_accuracy"]
        print(f"This answer names {shown_accuracy['objects_named_in_place']} of {shown_accuracy['objects']} objects "
              f"in the right place ({shown_accuracy['objects_fully_right']} with size and number right too); "
              f"over the {accuracy['descriptions']} descriptions, {accuracy['objects_named_in_place']} of "
              f"{accuracy['objects']} ({accuracy['objects_fully_right']} fully right). The target is small and "
              "trained for hours on a CPU: its sentences relating objects are often wrong "
              "(docs/experiments.md).")
    print(f"Outputs identical with and without speculation, in every repeat: {report['outputs_identical']}")
    print(f"Mean acceptance length (vLLM's 1 + accepted/drafts): {acceptance:.2f}")
    if report["cost_ratio"] is not None:
        print(f"One draft forward costs {forward_ms:.2f} ms against a target step of {step_ms:.2f} ms "
              f"(c = {report['cost_ratio']:.2f})")
    print(f"Speed-up over no speculation on this machine, concurrency 1: median {report['speedup']:.2f}x, "
          f"min {report['speedup_min']:.2f}x, max {report['speedup_max']:.2f}x over {len(repeats)} repeats")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Written: {options.out}")
    return report

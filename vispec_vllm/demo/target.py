"""Demo vision-language targets trained from scratch on synthetic scenes, small enough for a CPU.

The tiny targets of `vispec_vllm.factory.tiny_models` have random weights, so what they say does not
depend on the image and a ViSpec draft has nothing to learn. This module trains a LLaVA-1.5 model
(a 3-layer CLIP tower, a projector and a Llama of hidden size 128 with 4 decoder layers, 1.84M
parameters, or 16 for `scene-llava-deep`) on synthetic scenes for a budget of minutes or steps and
saves it in the llava-hf layout that vLLM serves (fp32). The recipes (`RECIPES_BY_NAME`; `RECIPES`
maps image tokens per image to the shipped two):
- `scene-llava` (36 image tokens): 96x96 images in 16-pixel patches, 1-4 shapes
  (`vispec_vllm.demo.scenes`), 12 minutes on one core; its greedy descriptions of held-out scenes
  name every object's size, colour, shape and place;
- `scene-llava-deep-grown` (576, LLaVA-1.5's count; the default pair): 192x192 images in 8-pixel
  patches, 4-9 labelled shapes, long answers and two-image comparisons (`vispec_vllm.demo.rich_scenes`),
  16 decoder layers: `scene-llava-deep` (`DEEP`, below, trained from scratch to a budget of steps)
  trained on for 3,000 more steps (`DEEP_GROWN`);
- by name only: `scene-llava-deep`, the base of the default target (the default pair's target before
  it), and `scene-llava-576`, the same scenes with 4 decoder layers, 65 minutes (the default before
  that).

    python -m vispec_vllm.demo.target OUT_DIR [--image-tokens 36|576 | --recipe NAME] [--minutes M] [--threads N]

Training checkpoints (`OUT_DIR/train_state/state.pt`: model, probe and optimizer) are written
every two minutes, together with a servable export of the model in OUT_DIR; running the command
again resumes from the checkpoint until the budget is spent (a larger budget of minutes extends a
finished run; a step budget given more steps, such as a restart, resumes it the same way).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch
from tqdm import tqdm

from vispec_vllm.demo import rich_scenes, scenes
from vispec_vllm.factory.hf_targets import (
    LLAVA_CHAT_TEMPLATE,
    LLAVA_SPECIAL_TOKENS,
    build_bpe_tokenizer,
    clip_vision_config,
    llama_text_config,
    save_target,
    to_llava_hf_layout,
)

VOCAB_SIZE = 1024
# Head size 32: vLLM's CPU attention takes 32, 64, 80, 96, 112, 128, ... only.
TEXT_DIMS = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
VISION_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
VISION_WARMUP_FRACTION = 0.2
PEAK_LR = 1e-3
LR_WARMUP_FRACTION = 0.03
CHECKPOINT_EVERY_S = 120.0
STATE_FILE = Path("train_state") / "state.pt"


@dataclass(frozen=True)
class TargetRecipe:
    """What differs between the demo targets: the scenes they learn and the image-token regime.

    `scenes` is a scene module (`vispec_vllm.demo.scenes` or `.rich_scenes`): IMAGE_SIZE,
    make_scene, training_example, patch_targets, PROBE_CLASSES, describe_messages, scene_texts.
    """

    name: str
    scenes: ModuleType
    patch_size: int
    batch_size: int  # conversations per step; on one core, more small steps beat fewer big ones
    vision_batch_size: int  # images per step of the vision warm-up
    max_new_tokens: int  # long enough for the longest reference answer
    default_minutes: float
    text_layers: int = 4  # decoder layers of the language model (width: TEXT_DIMS)
    # A budget in optimizer steps (vision warm-up steps, conversation steps) instead of minutes:
    # the same model whatever else the machine runs meanwhile, and across resumed sessions.
    steps: tuple[int, int] | None = None
    # A second conversation cycle after `steps`: (steps, peak lr). The lr warms up again and decays
    # by cosine to the first cycle's floor (a warm restart), on fresh training scenes.
    restart: tuple[int, float] | None = None
    # The shipped drafts' records and passes over them (`vispec-vllm build-demo`; the regime
    # experiment trains on its own, smaller budget).
    shipped_draft_records: int = 240
    shipped_draft_epochs: int = 10
    # A target grown from another recipe's shipped target (its fp16 weights cast back to float32):
    # conversation steps only, `steps` = (0, n), with no probe (the base's image tokens already carry
    # the scene), on training scenes after the ones the base drew.
    grown_from: str | None = None
    peak_lr: float = PEAK_LR  # the first cycle's peak
    # Forward passes under bfloat16 autocast (weights, gradients and AdamW stay float32): on this
    # CPU (AVX-512 BF16) a conversation step takes half the time.
    bf16_autocast: bool = False

    @property
    def total_steps(self) -> int:
        """The step budget: vision warm-up, conversations, and the restart's conversations."""
        if not self.steps:
            raise ValueError(f"recipe {self.name} trains to a time budget, not a step budget")
        return sum(self.steps) + (self.restart[0] if self.restart else 0)

    def learning_rate(self, step: int) -> float:
        """The lr at optimizer step `step` of a step budget: one warm-up and cosine decay over
        `steps`, then, with a restart, another over the restart's steps at its peak."""
        first_cycle = sum(self.steps)
        if step < first_cycle or self.restart is None:
            return _learning_rate(step / first_cycle, self.peak_lr)
        restart_steps, restart_peak = self.restart
        return _learning_rate((step - first_cycle) / restart_steps, restart_peak)

    @property
    def training_examples(self) -> int:
        """The training seeds a step budget draws, its base's included: one per image of the vision
        warm-up and one per conversation (a grown target starts the stream after its base's)."""
        vision_steps = self.steps[0] if self.steps else 0  # a time budget: total_steps says so
        own = vision_steps * self.vision_batch_size + (self.total_steps - vision_steps) * self.batch_size
        return own + (RECIPES_BY_NAME[self.grown_from].training_examples if self.grown_from else 0)

    @property
    def image_size(self) -> int:
        return self.scenes.IMAGE_SIZE

    @property
    def num_image_tokens(self) -> int:
        """LLaVA-1.5 layout: one token per vision patch (the CLS token is dropped)."""
        return (self.image_size // self.patch_size) ** 2


# 96x96 images in 16-pixel patches (two per grid cell, see scenes._draw): 36 image tokens.
SMALL = TargetRecipe("scene-llava", scenes, patch_size=16, batch_size=8, vision_batch_size=16,
                     max_new_tokens=160, default_minutes=12.0)
# 192x192 images in 8-pixel patches: 576 image tokens, LLaVA-1.5's count (336 px / 14 px).
LLAVA15_SCALE = TargetRecipe("scene-llava-576", rich_scenes, patch_size=8, batch_size=4, vision_batch_size=8,
                             max_new_tokens=448, default_minutes=65.0)
# LLaVA-1.5 layout and scenes with a real VLM's depth ratio: 16 decoder layers against the draft's
# one (LLaVA-1.5-7B has 32, Qwen2.5-VL-7B 28), so a draft forward is a small share of a target step.
# Trained from scratch, not grown from scene-llava-576: that target has seen scenes in every layout,
# and this one must never have seen an evaluation layout (rich_scenes holds layouts out by content).
# 8,000 vision warm-up steps (8 images each), then 4,000 conversation steps (4 each): 254 minutes
# over three sessions. Its held-out accuracy was low (63% of objects placed) and the loss still
# falling, so a warm restart adds 2,000 conversation steps at a peak lr of 3e-4 (62 minutes; then
# 82% placed, 64% fully right: docs/experiments.md). Its drafts train on 1,920 records (12 minutes
# of generation), 5 passes.
DEEP = TargetRecipe("scene-llava-deep", rich_scenes, patch_size=8, batch_size=4, vision_batch_size=8,
                    max_new_tokens=448, default_minutes=240.0, text_layers=16, steps=(8000, 4000),
                    restart=(2000, 3e-4), shipped_draft_records=1920, shipped_draft_epochs=5)
# The default 576-token target: scene-llava-deep trained on (docs/experiments.md, "Training the deep
# target on"): 3,000 more conversation steps from the shipped target, on training scenes it never drew,
# at a peak lr of 3e-4 with a fresh AdamW (the shipped target has no optimizer state), forward passes
# in bfloat16 (126 minutes; 93% of held-out objects placed, 80% fully right). Its drafts train as
# scene-llava-deep's did.
DEEP_GROWN = replace(DEEP, name="scene-llava-deep-grown", steps=(0, 3000), restart=None, grown_from=DEEP.name,
                     peak_lr=3e-4, bf16_autocast=True)
# The shipped pairs' recipes by image tokens per image; scene-llava-deep (the default's base, and the
# default before it) and scene-llava-576 (4 layers, the default before that) stay reproducible by name.
RECIPES = {recipe.num_image_tokens: recipe for recipe in (SMALL, DEEP_GROWN)}
RECIPES_BY_NAME = {recipe.name: recipe for recipe in (SMALL, LLAVA15_SCALE, DEEP, DEEP_GROWN)}
# The 36-token target's names, kept for its tests and tools.
PATCH_SIZE = SMALL.patch_size
NUM_IMAGE_TOKENS = SMALL.num_image_tokens
# Every colour-shape pair a description names, e.g. "red circle" in "a large red circle".
_PAIR_PATTERN = re.compile(rf"\b({'|'.join(scenes.COLOURS)}) ({'|'.join(scenes.SHAPES)})\b")


def build_scene_tokenizer(recipe: TargetRecipe = SMALL, vocab_size: int = VOCAB_SIZE):
    """The tiny models' byte-level BPE recipe (LLaVA specials and chat template) trained on scene
    texts and the chat template's words, so scene words are mostly single tokens."""
    corpus = [*recipe.scenes.scene_texts(range(2000)), *(["USER: ASSISTANT:"] * 200)]
    return build_bpe_tokenizer(corpus, LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, "llava", vocab_size=vocab_size,
                               padding_tokens=32)


def build_demo_target(seed: int = 0, recipe: TargetRecipe = SMALL):
    """The untrained model (HF `LlavaForConditionalGeneration`) and its processor."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_scene_tokenizer(recipe)
    text_dims = {**TEXT_DIMS, "num_hidden_layers": recipe.text_layers}
    text_config = llama_text_config(tok, vocab_size=VOCAB_SIZE, **text_dims)
    text_config["head_dim"] = TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"]
    vision_config = {
        **clip_vision_config(),
        **VISION_DIMS,
        "image_size": recipe.image_size,
        "patch_size": recipe.patch_size,
        "projection_dim": VISION_DIMS["hidden_size"],
    }
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=recipe.num_image_tokens,
        # The last CLIP layer's output: with a tower this small every layer should count.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    size = {"height": recipe.image_size, "width": recipe.image_size}
    image_processor = CLIPImageProcessor(size={"shortest_edge": recipe.image_size}, crop_size=size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def load_base_target(recipe_name: str, base_dir: Path | None = None):
    """A built target of recipe `recipe_name` (default: the shipped one, `vispec_vllm/demo/models/<name>`)
    in float32, and its processor: where a recipe grown from it starts."""
    from transformers import LlavaForConditionalGeneration

    from vispec_vllm.demo.models import DEMO_DIR

    base_dir = base_dir or DEMO_DIR / recipe_name
    if not (base_dir / "config.json").exists():
        raise FileNotFoundError(f"{base_dir}: the base target `{recipe_name}` is not built; `vispec-vllm build-demo` "
                                "builds it before the target grown from it")
    # Built as the base was, then given its weights: the grown target's config and processor files
    # are the base's, not what from_pretrained adds to them (a float32 dtype beside fp16 weights).
    model, processor = build_demo_target(recipe=RECIPES_BY_NAME[recipe_name])
    model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).state_dict())
    return model, processor


def encode_conversation(processor, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation, with each image token expanded as the processor does,
    and labels that train only on the assistant's answers (and their end-of-turn token)."""
    tok = processor.tokenizer
    image_tokens = (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of " answer</s>" after each "ASSISTANT:"
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(processor.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False))
            spans.append((start, len(processor.apply_chat_template(messages[: i + 1], tokenize=False))))
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    ids: list[int] = []
    labels: list[int] = []
    for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        copies = image_tokens if token == image_id else 1
        trained = any(start <= begin < end for start, end in spans)
        ids += [token] * copies
        labels += [token if trained else -100] * copies
    return ids, labels


class PatchProbe(torch.nn.Module):
    """Linear read-outs of what each projected image token should say (its cell, and its object's
    colour, shape, size and, on rich scenes, number label); trained beside the model and thrown away.

    Its loss reaches the vision tower and the projector directly, so the image tokens the language
    model reads carry the scene within the first minutes; from the captioning loss alone, a few CPU
    minutes leave the model describing a typical scene whatever the image shows.
    """

    def __init__(self, hidden_size: int, classes: tuple[int, ...]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden_size, n) for n in classes)

    def loss(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the read-outs; `image_tokens` (B, N, H), `targets` (B, N, heads)."""
        losses = [
            torch.nn.functional.cross_entropy(head(image_tokens).flatten(0, 1), targets[..., i].flatten())
            for i, head in enumerate(self.heads)
        ]
        return torch.stack(losses).mean()


def _images(processor, recipe: TargetRecipe, scenes_: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values of `scenes_` and their probe targets."""
    pixels = processor.image_processor(images=[scene.image for scene in scenes_], return_tensors="pt")["pixel_values"]
    return pixels, torch.stack([recipe.scenes.patch_targets(scene, recipe.patch_size) for scene in scenes_])


def _batch(processor, recipe: TargetRecipe, examples: list[tuple[list, list[dict]]]) -> dict[str, torch.Tensor]:
    """A right-padded training batch of (scenes, messages) examples, with the probe's targets."""
    encoded = [encode_conversation(processor, messages) for _, messages in examples]
    length = max(len(ids) for ids, _ in encoded)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(examples), length), pad)
    labels = torch.full((len(examples), length), -100)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    pixels, probe_targets = _images(processor, recipe, [scene for scenes_, _ in examples for scene in scenes_])
    return dict(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        pixel_values=pixels,
        probe_targets=probe_targets,
    )


def _learning_rate(progress: float, peak: float = PEAK_LR) -> float:
    """Linear warm-up to `peak`, then cosine decay to 5% of PEAK_LR, over the fraction of the budget
    used (the number of steps a time budget buys is not known in advance)."""
    if progress < LR_WARMUP_FRACTION:
        return peak * max(progress, 1e-3) / LR_WARMUP_FRACTION
    decay = (min(progress, 1.0) - LR_WARMUP_FRACTION) / (1 - LR_WARMUP_FRACTION)
    floor = 0.05 * PEAK_LR
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * decay))


def _export(model, processor, recipe: TargetRecipe, out_dir: Path) -> None:
    """Write the servable model (llava-hf layout, fp32) to `out_dir`."""
    model.generation_config.max_new_tokens = recipe.max_new_tokens
    save_target(model, processor, out_dir, to_llava_hf_layout(model.state_dict()))


def _compact_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with its moment tensors in bfloat16: the state file is small enough to
    keep in version control between sessions (`load_state_dict` casts them back to the parameters'
    float32)."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: value.bfloat16() if value.is_floating_point() and value.dim() else value
                              for key, value in moments.items()}
                      for index, moments in state["state"].items()}
    return state


def _checkpoint(model, probe, optimizer, processor, recipe: TargetRecipe, out_dir: Path, step: int, seen: int,
                elapsed: float) -> None:
    state_path = out_dir / STATE_FILE
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(
        model=model.state_dict(),
        probe=probe.state_dict() if probe else {},
        optimizer=_compact_optimizer_state(optimizer),
        step=step,
        seen=seen,
        elapsed=elapsed,
    )
    torch.save(state, state_path.with_suffix(".tmp"))
    state_path.with_suffix(".tmp").replace(state_path)  # an interrupted save keeps the old checkpoint
    _export(model, processor, recipe, out_dir)


def train_demo_target(out_dir: str | Path, minutes: float | None = None, seed: int = 0,
                      recipe: TargetRecipe = SMALL, threads: int = 1, base_dir: Path | None = None) -> Path:
    """Train the demo target for `minutes` of wall time in total (default: the recipe's), resuming a
    checkpoint in `out_dir` if there is one; save it to `out_dir` and return that path.

    A recipe with a step budget (`recipe.steps`) trains for that many steps instead, whatever `minutes`.
    Two stages, both on fresh training scenes (no scene is seen twice), with AdamW:
    - for the first VISION_WARMUP_FRACTION of the time (or the recipe's vision steps), the vision
      tower and projector alone learn
      the `PatchProbe` targets (an image costs a fraction of a conversation, so they see many);
    - then the whole model learns the conversations (cross-entropy on the assistant's tokens only),
      with the probe's loss kept on the image tokens.
    A grown recipe (`recipe.grown_from`) starts from its base's target in `base_dir` (default: the
    shipped one) and trains the conversations alone, on the training scenes after the base's.
    One thread by default, so that another job can use the other core.
    """
    started = time.monotonic()
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    budget = (recipe.default_minutes if minutes is None else minutes) * 60.0
    if recipe.grown_from:
        model, processor = load_base_target(recipe.grown_from, base_dir)
        probe = None
        seen_before = RECIPES_BY_NAME[recipe.grown_from].training_examples
    else:
        model, processor = build_demo_target(seed, recipe)
        probe = PatchProbe(TEXT_DIMS["hidden_size"], recipe.scenes.PROBE_CLASSES)
        seen_before = 0
    image_tokens: list[torch.Tensor] = []
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, output: image_tokens.append(output))
    parameters = [*model.parameters(), *(probe.parameters() if probe else ())]
    optimizer = torch.optim.AdamW(parameters, lr=PEAK_LR, betas=(0.9, 0.98), weight_decay=0.01)
    step, seen = 0, seen_before
    trained_s = 0.0  # training time before this call, from the checkpoint
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        if probe:
            probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        step, seen, trained_s = state["step"], state["seen"], state["elapsed"]
        started -= trained_s
        of = f"{recipe.total_steps} steps" if recipe.steps else f"{budget / 60} min"
        print(f"resuming at step {step} ({state['elapsed'] / 60:.1f} min trained; budget {of})", flush=True)
    resumed_step = step
    seeds = recipe.scenes.train_seed_stream(seed)
    for _ in range(seen):
        next(seeds)
    print(f"demo target {recipe.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{recipe.num_image_tokens} image tokens", flush=True)

    model.train()
    last_checkpoint = time.monotonic()
    running = None
    if recipe.steps:  # progress and the two stages by step
        vision_steps, total_steps = recipe.steps[0], recipe.total_steps
        progress = tqdm(total=total_steps, initial=step, unit="step", mininterval=10, desc=recipe.name,
                        bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} steps "
                        "[{elapsed}<{remaining}] {postfix}")

        def fraction_done(_elapsed: float) -> float:
            return step / total_steps

        def learning_rate(_elapsed: float) -> float:
            return recipe.learning_rate(step)

        def in_vision_warmup(_elapsed: float) -> bool:
            return step < vision_steps
    else:  # by wall time: the bar counts seconds, so its ETA is the time left to train
        progress = tqdm(total=round(budget), initial=round(time.monotonic() - started), unit="s", mininterval=10,
                        desc=recipe.name, bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} s "
                        "[{elapsed}<{remaining}] {postfix}")

        def fraction_done(elapsed: float) -> float:
            return elapsed / budget

        def learning_rate(elapsed: float) -> float:
            return _learning_rate(fraction_done(elapsed))

        def in_vision_warmup(elapsed: float) -> bool:
            return elapsed < VISION_WARMUP_FRACTION * budget
    while fraction_done(elapsed := time.monotonic() - started) < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(elapsed)
        image_tokens.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
            if in_vision_warmup(elapsed):
                batch_scenes = [recipe.scenes.make_scene(next(seeds)) for _ in range(recipe.vision_batch_size)]
                pixels, probe_targets = _images(processor, recipe, batch_scenes)
                model.model.get_image_features(pixel_values=pixels)
                loss, count = None, len(batch_scenes)
            else:
                examples = [recipe.scenes.training_example(next(seeds)) for _ in range(recipe.batch_size)]
                batch = _batch(processor, recipe, examples)
                probe_targets = batch.pop("probe_targets")
                loss, count = model(**batch).loss, len(examples)
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            probe_loss = (probe.loss(image_tokens[0].view(len(probe_targets), -1, image_tokens[0].shape[-1]),
                                     probe_targets) if probe else None)
        optimizer.zero_grad(set_to_none=True)
        sum(part for part in (loss, probe_loss) if part is not None).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step, seen = step + 1, seen + count
        progress.update(1 if recipe.steps else round(time.monotonic() - started) - progress.n)
        probe_text = f", probe {probe_loss.item():.4f}" if probe else ""
        progress.set_postfix_str(f"step {step}, " + ("vision warm-up" if loss is None else
                                 f"loss {loss.item():.3f} (avg {running:.3f})") + probe_text, refresh=False)
        if step % 50 == 0:
            text = "vision warm-up" if loss is None else f"loss {loss.item():.4f}  avg {running:.4f}"
            progress.write(f"step {step:5d}  {elapsed / 60:5.1f} min  {text}{probe_text}")
        if time.monotonic() - last_checkpoint > CHECKPOINT_EVERY_S:
            _checkpoint(model, probe, optimizer, processor, recipe, out_dir, step, seen, time.monotonic() - started)
            last_checkpoint = time.monotonic()
    progress.close()
    model.eval()
    # A call that found the budget spent trains nothing, and leaves the recorded training time as it was.
    elapsed = time.monotonic() - started if step > resumed_step else trained_s
    _checkpoint(model, probe, optimizer, processor, recipe, out_dir, step, seen, elapsed)
    print(f"saved {out_dir} after {step} steps, {seen} examples, {elapsed / 60:.1f} min", flush=True)
    return out_dir


def names_every_object(text: str, objects: tuple) -> bool:
    """True when the colour-shape pairs `text` names are exactly the objects' (none missed, none made up)."""
    return set(_PAIR_PATTERN.findall(text)) == {(obj.colour, obj.shape) for obj in objects}


def generate_descriptions(target_dir: str | Path, seeds: list[int], max_new_tokens: int | None = None,
                          recipe: TargetRecipe = SMALL) -> list[str]:
    """Greedy descriptions of the scenes of `seeds` by the model in `target_dir` (HF transformers)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(target_dir)
    model = AutoModelForImageTextToText.from_pretrained(target_dir, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template(recipe.scenes.describe_messages(), add_generation_prompt=True)
    texts = []
    for seed in seeds:
        inputs = processor(text=[prompt], images=[recipe.scenes.make_scene(seed).image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens or recipe.max_new_tokens, do_sample=False)
        texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


def evaluate_descriptions(target_dir: str | Path, num_images: int = 20, show: int = 0,
                          recipe: TargetRecipe = SMALL) -> float:
    """Fraction of held-out scenes whose greedy description names every object's colour and shape,
    and no object that is not there; prints the first `show` descriptions beside their references."""
    seeds = recipe.scenes.held_out_seeds(num_images)
    texts = generate_descriptions(target_dir, seeds, recipe=recipe)
    scenes_ = [recipe.scenes.make_scene(seed) for seed in seeds]
    for scene, text in list(zip(scenes_, texts, strict=True))[:show]:
        print(f"held-out scene {scene.seed}\n  generated: {text}\n  reference: {scene.description}", flush=True)
    return sum(names_every_object(text, scene.objects) for scene, text in zip(scenes_, texts, strict=True)) / num_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--image-tokens", type=int, default=SMALL.num_image_tokens, choices=sorted(RECIPES),
                        help="which demo target: 36 (96 px, 16 px patches) or 576 (192 px, 8 px patches)")
    parser.add_argument("--recipe", choices=sorted(RECIPES_BY_NAME),
                        help="a recipe by name (overrides --image-tokens), e.g. scene-llava-deep")
    parser.add_argument("--minutes", type=float, default=None,
                        help="total training time (default: the recipe's; a step budget ignores it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-images", type=int, default=20, help="held-out images to evaluate on (0: none)")
    args = parser.parse_args(argv)
    recipe = RECIPES_BY_NAME[args.recipe] if args.recipe else RECIPES[args.image_tokens]
    train_demo_target(args.out_dir, args.minutes, args.seed, recipe, args.threads)
    if args.eval_images:
        score = evaluate_descriptions(args.out_dir, args.eval_images, show=2, recipe=recipe)
        print(f"held-out descriptions naming every object's colour and shape: {score:.0%}", flush=True)


if __name__ == "__main__":
    main()

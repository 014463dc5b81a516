"""A demo vision-language target trained from scratch on synthetic scenes, small enough for a CPU.

The tiny targets of `vispec_vllm.factory.tiny_models` have random weights, so what they say does not
depend on the image and a ViSpec draft has nothing to learn. This module trains a LLaVA-1.5 model
(a 3-layer CLIP tower on 96x96 images in 16-pixel patches, i.e. 36 image tokens, a projector, and
a 4-layer Llama of hidden size 128; 1.85M parameters) on `vispec_vllm.demo.scenes` for a fixed number of
minutes on one CPU core, and saves it in the llava-hf layout that vLLM serves (fp32, 7.4 MB).
After the default 12 minutes its greedy descriptions of held-out scenes name every object's size,
colour, shape and place, which a text-only model cannot guess.

    python -m vispec_vllm.demo.target OUT_DIR [--minutes 12] [--seed 0] [--eval-images 20]

Training checkpoints (`OUT_DIR/train_state/state.pt`: model, probe and optimizer) are written
every two minutes, together with a servable export of the model in OUT_DIR; running the command
again resumes from the checkpoint until the total budget of minutes is spent.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch

from vispec_vllm.demo.scenes import (
    COLOURS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    conversation,
    describe_messages,
    held_out_seeds,
    make_scene,
    scene_texts,
    train_seed_stream,
)
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
PATCH_SIZE = 16  # two patches per grid cell, see scenes._draw
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
VISION_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
# Head size 32: vLLM's CPU attention takes 32, 64, 80, 96, 112, 128, ... only.
TEXT_DIMS = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)
BATCH_SIZE = 8  # conversations per step; on one core, more small steps beat fewer big ones here
VISION_BATCH_SIZE = 16  # images per step of the vision warm-up
VISION_WARMUP_FRACTION = 0.2
PEAK_LR = 1e-3
LR_WARMUP_FRACTION = 0.03
CHECKPOINT_EVERY_S = 120.0
STATE_FILE = Path("train_state") / "state.pt"
# The probe's targets for each image token: its grid cell, and the colour, shape and size of the
# object in that cell (class 0: no object).
PROBE_CLASSES = (GRID * GRID, len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
# Every colour-shape pair a description names, e.g. "red circle" in "a large red circle".
_PAIR_PATTERN = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def build_scene_tokenizer(vocab_size: int = VOCAB_SIZE):
    """The tiny models' byte-level BPE recipe (LLaVA specials and chat template) trained on scene
    texts and the chat template's words, so scene words are mostly single tokens."""
    corpus = [*scene_texts(range(2000)), *(["USER: ASSISTANT:"] * 200)]
    return build_bpe_tokenizer(corpus, LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, "llava", vocab_size=vocab_size,
                               padding_tokens=32)


def build_demo_target(seed: int = 0):
    """The untrained model (HF `LlavaForConditionalGeneration`) and its processor."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_scene_tokenizer()
    text_config = llama_text_config(tok, vocab_size=VOCAB_SIZE, **TEXT_DIMS)
    text_config["head_dim"] = TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"]
    vision_config = {
        **clip_vision_config(),
        **VISION_DIMS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "projection_dim": VISION_DIMS["hidden_size"],
    }
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=NUM_IMAGE_TOKENS,
        # The last CLIP layer's output: with a tower this small every layer should count.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def encode_conversation(processor, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation, with the image token expanded as the processor does,
    and labels that train only on the assistant's answers (and their end-of-turn token)."""
    tok = processor.tokenizer
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
        copies = NUM_IMAGE_TOKENS if token == image_id else 1
        trained = any(start <= begin < end for start, end in spans)
        ids += [token] * copies
        labels += [token if trained else -100] * copies
    return ids, labels


def patch_targets(scene: Scene) -> torch.Tensor:
    """(NUM_IMAGE_TOKENS, 4) probe targets: for the cell under each patch's centre, the cell index
    and the colour, shape and size of its object (each 0 for an empty cell, else 1 + index)."""
    side = IMAGE_SIZE // PATCH_SIZE
    by_cell = {obj.cell: obj for obj in scene.objects}
    colours = list(COLOURS)
    rows = []
    for patch in range(NUM_IMAGE_TOKENS):
        y, x = ((patch // side + 0.5) * PATCH_SIZE, (patch % side + 0.5) * PATCH_SIZE)
        cell = (int(y * GRID // IMAGE_SIZE), int(x * GRID // IMAGE_SIZE))
        obj = by_cell.get(cell)
        attributes = (colours.index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size)) if obj else (-1,) * 3
        rows.append((cell[0] * GRID + cell[1], *(1 + a for a in attributes)))
    return torch.tensor(rows)


class PatchProbe(torch.nn.Module):
    """Linear read-outs of what each projected image token should say (its cell, and its object's
    colour, shape and size); trained beside the model and thrown away.

    Its loss reaches the vision tower and the projector directly, so the image tokens the language
    model reads carry the scene within the first minutes; from the captioning loss alone, a few CPU
    minutes leave the model describing a typical scene whatever the image shows.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden_size, n) for n in PROBE_CLASSES)

    def loss(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the four read-outs; `image_tokens` (B, N, H), `targets` (B, N, 4)."""
        losses = [
            torch.nn.functional.cross_entropy(head(image_tokens).flatten(0, 1), targets[..., i].flatten())
            for i, head in enumerate(self.heads)
        ]
        return torch.stack(losses).mean()


def _images(processor, scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values of `scenes` and their probe targets."""
    pixels = processor.image_processor(images=[scene.image for scene in scenes], return_tensors="pt")["pixel_values"]
    return pixels, torch.stack([patch_targets(scene) for scene in scenes])


def _batch(processor, scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """A right-padded training batch of the conversations of `scenes`, with the probe's targets."""
    encoded = [encode_conversation(processor, conversation(scene)) for scene in scenes]
    length = max(len(ids) for ids, _ in encoded)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(scenes), length), pad)
    labels = torch.full((len(scenes), length), -100)
    attention_mask = torch.zeros((len(scenes), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    pixels, probe_targets = _images(processor, scenes)
    return dict(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        pixel_values=pixels,
        probe_targets=probe_targets,
    )


def _learning_rate(progress: float) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak, over the fraction of the time budget used
    (the number of steps a time budget buys is not known in advance)."""
    if progress < LR_WARMUP_FRACTION:
        return PEAK_LR * max(progress, 1e-3) / LR_WARMUP_FRACTION
    decay = (min(progress, 1.0) - LR_WARMUP_FRACTION) / (1 - LR_WARMUP_FRACTION)
    return PEAK_LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * decay)))


def _export(model, processor, out_dir: Path) -> None:
    """Write the servable model (llava-hf layout, fp32) to `out_dir`."""
    model.generation_config.max_new_tokens = 160
    save_target(model, processor, out_dir, to_llava_hf_layout(model.state_dict()))


def _checkpoint(model, probe, optimizer, processor, out_dir: Path, step: int, seen: int, elapsed: float) -> None:
    state_path = out_dir / STATE_FILE
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(
        model=model.state_dict(),
        probe=probe.state_dict(),
        optimizer=optimizer.state_dict(),
        step=step,
        seen=seen,
        elapsed=elapsed,
    )
    torch.save(state, state_path.with_suffix(".tmp"))
    state_path.with_suffix(".tmp").replace(state_path)  # an interrupted save keeps the old checkpoint
    _export(model, processor, out_dir)


def train_demo_target(out_dir: str | Path, minutes: float = 12.0, seed: int = 0) -> Path:
    """Train the demo target for `minutes` of wall time in total (resuming a checkpoint in `out_dir`
    if there is one), save it to `out_dir` and return that path.

    Two stages, both on fresh training scenes (no scene is seen twice), with AdamW:
    - for the first VISION_WARMUP_FRACTION of the time, the vision tower and projector alone learn
      the `PatchProbe` targets (an image costs a fraction of a conversation, so they see many);
    - then the whole model learns the conversations (cross-entropy on the assistant's tokens only),
      with the probe's loss kept on the image tokens.
    One thread, so that another job can use the other core.
    """
    started = time.monotonic()
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    budget = minutes * 60.0
    model, processor = build_demo_target(seed)
    probe = PatchProbe(TEXT_DIMS["hidden_size"])
    image_tokens: list[torch.Tensor] = []
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, output: image_tokens.append(output))
    parameters = [*model.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=PEAK_LR, betas=(0.9, 0.98), weight_decay=0.01)
    step, seen = 0, 0
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        step, seen = state["step"], state["seen"]
        started -= state["elapsed"]
        print(f"resuming at step {step} ({state['elapsed'] / 60:.1f} of {minutes} min)", flush=True)
    seeds = train_seed_stream(seed)
    for _ in range(seen):
        next(seeds)
    print(f"demo target: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    model.train()
    last_checkpoint = time.monotonic()
    running = None
    while (elapsed := time.monotonic() - started) < budget:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(elapsed / budget)
        image_tokens.clear()
        if elapsed < VISION_WARMUP_FRACTION * budget:
            scenes = [make_scene(next(seeds)) for _ in range(VISION_BATCH_SIZE)]
            pixels, probe_targets = _images(processor, scenes)
            model.model.get_image_features(pixel_values=pixels)
            loss = None
        else:
            scenes = [make_scene(next(seeds)) for _ in range(BATCH_SIZE)]
            batch = _batch(processor, scenes)
            probe_targets = batch.pop("probe_targets")
            loss = model(**batch).loss
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        probe_loss = probe.loss(image_tokens[0], probe_targets)
        optimizer.zero_grad(set_to_none=True)
        (probe_loss if loss is None else loss + probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        step, seen = step + 1, seen + len(scenes)
        if step % 50 == 0:
            text = "vision warm-up" if loss is None else f"loss {loss.item():.4f}  avg {running:.4f}"
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  {text}  probe {probe_loss.item():.4f}", flush=True)
        if time.monotonic() - last_checkpoint > CHECKPOINT_EVERY_S:
            _checkpoint(model, probe, optimizer, processor, out_dir, step, seen, time.monotonic() - started)
            last_checkpoint = time.monotonic()
    model.eval()
    _checkpoint(model, probe, optimizer, processor, out_dir, step, seen, time.monotonic() - started)
    print(f"saved {out_dir} after {step} steps, {seen} scenes, {elapsed / 60:.1f} min", flush=True)
    return out_dir


def names_every_object(text: str, objects: tuple[SceneObject, ...]) -> bool:
    """True when the colour-shape pairs `text` names are exactly the objects' (none missed, none made up)."""
    return set(_PAIR_PATTERN.findall(text)) == {(obj.colour, obj.shape) for obj in objects}


def generate_descriptions(target_dir: str | Path, seeds: list[int], max_new_tokens: int = 160) -> list[str]:
    """Greedy descriptions of the scenes of `seeds` by the model in `target_dir` (HF transformers)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(target_dir)
    model = AutoModelForImageTextToText.from_pretrained(target_dir, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template(describe_messages(), add_generation_prompt=True)
    texts = []
    for seed in seeds:
        inputs = processor(text=[prompt], images=[make_scene(seed).image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return texts


def evaluate_descriptions(target_dir: str | Path, num_images: int = 20, show: int = 0) -> float:
    """Fraction of held-out scenes whose greedy description names every object's colour and shape,
    and no object that is not there; prints the first `show` descriptions beside their references."""
    seeds = held_out_seeds(num_images)
    texts = generate_descriptions(target_dir, seeds)
    scenes = [make_scene(seed) for seed in seeds]
    for scene, text in list(zip(scenes, texts, strict=True))[:show]:
        print(f"held-out scene {scene.seed}\n  generated: {text}\n  reference: {scene.description}", flush=True)
    return sum(names_every_object(text, scene.objects) for scene, text in zip(scenes, texts, strict=True)) / num_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--minutes", type=float, default=12.0, help="total training time (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=20, help="held-out images to evaluate on (0: none)")
    args = parser.parse_args(argv)
    train_demo_target(args.out_dir, args.minutes, args.seed)
    if args.eval_images:
        score = evaluate_descriptions(args.out_dir, args.eval_images, show=2)
        print(f"held-out descriptions naming every object's colour and shape: {score:.0%}", flush=True)


if __name__ == "__main__":
    main()

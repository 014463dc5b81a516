"""How correctly the shipped demo target describes held-out scenes.

    python benchmarks/description_accuracy.py [--num-images 100] [--target DIR]

For each of the first N held-out scenes, the target's greedy description (Hugging Face
transformers, float32, up to 160 new tokens) is correct when the colour-shape pairs it names are
exactly the scene's objects: none missed, none made up (`vispec_vllm.demo.target.names_every_object`).
Writes benchmarks/results/description_accuracy.json: the rate over the first 20 and over all N,
and every scene's objects, generated text, reference description and verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, machine_description, write_json


def main() -> None:
    from vispec_vllm.demo.models import DEMO_TARGET
    from vispec_vllm.demo.scenes import held_out_seeds, make_scene
    from vispec_vllm.demo.target import generate_descriptions, names_every_object

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=DEMO_TARGET)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "description_accuracy.json")
    args = parser.parse_args()

    seeds = held_out_seeds(args.num_images)
    texts = generate_descriptions(args.target, seeds)
    scenes = []
    for seed, text in zip(seeds, texts, strict=True):
        scene = make_scene(seed)
        scenes.append({"seed": seed, "objects": [f"{obj.size} {obj.colour} {obj.shape}" for obj in scene.objects],
                       "generated": text, "reference": scene.description,
                       "correct": names_every_object(text, scene.objects)})

    def rate(items: list[dict]) -> float:
        return sum(item["correct"] for item in items) / len(items)

    first = scenes[:20]
    report = {"machine": machine_description(), "target": args.target.name,
              "command": "python benchmarks/description_accuracy.py",
              "criterion": "the colour-shape pairs the greedy description names are exactly the scene's objects",
              "correct_first_20": sum(s["correct"] for s in first), "rate_first_20": rate(first),
              "correct": sum(s["correct"] for s in scenes), "num_images": len(scenes), "rate": rate(scenes),
              "scenes": scenes}
    write_json(report, args.out)
    print(f"correct: {report['correct_first_20']} of 20, {report['correct']} of {len(scenes)}; wrote {args.out}")


if __name__ == "__main__":
    main()

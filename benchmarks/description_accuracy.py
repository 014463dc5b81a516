"""How correctly a shipped demo target describes held-out scenes.

    python benchmarks/description_accuracy.py --image-tokens 576   # the default pair's target, scene-llava-deep-grown:
                                                   # writes description_accuracy_scene-llava-deep-grown.json
    python benchmarks/description_accuracy.py --image-tokens 36    # writes description_accuracy.json
    python benchmarks/description_accuracy.py --recipe NAME --target DIR   # any recipe's target

For each of the first N held-out scenes, the target's greedy description (Hugging Face
transformers, float32, up to the target's longest answer) is correct when the colour-shape pairs it
names are exactly the scene's objects: none missed, none made up
(`vispec_vllm.demo.target.names_every_object`). On the rich scenes of the 576-token target it also
counts the objects whose sentence gives the right place, size, colour, shape and number label.
Writes the rates over the first 20 and over all N, and every scene's objects, generated text,
reference description and verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, machine_description, write_json


def default_out(recipe_name: str) -> Path:
    """description_accuracy.json for the 36-token target (its first artefact's name), else named by recipe."""
    return RESULTS / ("description_accuracy.json" if recipe_name == "scene-llava"
                      else f"description_accuracy_{recipe_name}.json")


def main() -> None:
    from vispec_vllm.demo.models import DEMO_PAIRS
    from vispec_vllm.demo.target import RECIPES, RECIPES_BY_NAME, generate_descriptions, names_every_object

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-tokens", type=int, default=36, choices=sorted(DEMO_PAIRS))
    parser.add_argument("--recipe", choices=sorted(RECIPES_BY_NAME), help="a target recipe by name "
                        "(overrides --image-tokens; give --target unless the recipe's target is shipped)")
    parser.add_argument("--target", type=Path, help="default: the shipped target of the regime")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    recipe = RECIPES_BY_NAME[args.recipe] if args.recipe else RECIPES[args.image_tokens]
    target = args.target or DEMO_PAIRS[recipe.num_image_tokens][0]
    out = args.out or default_out(recipe.name)
    scenes_module = recipe.scenes
    per_object = hasattr(scenes_module, "object_accuracy")

    seeds = scenes_module.held_out_seeds(args.num_images)
    texts = generate_descriptions(target, seeds, recipe=recipe)
    scenes = []
    for seed, text in zip(seeds, texts, strict=True):
        scene = scenes_module.make_scene(seed)
        row = {"seed": seed, "objects": [f"{obj.noun} {obj.label} {obj.place}" if per_object else obj.noun
                                         for obj in scene.objects],
               "generated": text, "reference": scene.description,
               "correct": names_every_object(text, scene.objects)}
        if per_object:
            accuracy = scenes_module.object_accuracy(text, scene.objects)
            row["objects_fully_correct"] = accuracy.fully_right
            row["objects_named_in_place"] = accuracy.named_in_place
        scenes.append(row)

    def rate(items: list[dict]) -> float:
        return sum(item["correct"] for item in items) / len(items)

    first = scenes[:20]
    # The command as a user reruns it: the target relative to the checkout where it lies in it.
    shown_target = target.resolve()
    if shown_target.is_relative_to(Path.cwd()):
        shown_target = shown_target.relative_to(Path.cwd())
    which = f"--recipe {args.recipe} --target {shown_target}" if args.recipe else f"--image-tokens {args.image_tokens}"
    which += f" --num-images {args.num_images}"
    report = {"machine": machine_description(), "target": target.name, "image_tokens": recipe.num_image_tokens,
              "command": f"python benchmarks/description_accuracy.py {which}",
              "held_out": "seeds from HELD_OUT_START on"
              + (", in the held-out layout bucket (rich_scenes.layout_is_held_out; a target trained after the "
                 "content split, such as scene-llava-deep, never saw these layouts)" if hasattr(scenes_module, "layout")
                 else ""),
              "criterion": "the colour-shape pairs the greedy description names are exactly the scene's objects",
              "correct_first_20": sum(s["correct"] for s in first), "rate_first_20": rate(first),
              "correct": sum(s["correct"] for s in scenes), "num_images": len(scenes), "rate": rate(scenes)}
    if per_object:
        total = sum(len(s["objects"]) for s in scenes)
        report["object_criterion"] = "an object sentence gives the object's place, size, colour, shape and number"
        report["objects_fully_correct"] = sum(s["objects_fully_correct"] for s in scenes)
        report["num_objects"] = total
        report["object_rate"] = report["objects_fully_correct"] / total
        report["placed_criterion"] = "an object sentence names the object's colour and shape at its place"
        report["objects_named_in_place"] = sum(s["objects_named_in_place"] for s in scenes)
        report["placed_rate"] = report["objects_named_in_place"] / total
    report["scenes"] = scenes
    write_json(report, out)
    print(f"correct: {report['correct_first_20']} of 20, {report['correct']} of {len(scenes)}"
          + (f"; objects fully correct {report['objects_fully_correct']} of {report['num_objects']}, named in "
             f"place {report['objects_named_in_place']}" if per_object else "") + f"; wrote {out}")


if __name__ == "__main__":
    main()

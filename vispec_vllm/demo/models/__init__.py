"""The shipped demo pairs: small LLaVA-layout targets trained from scratch on synthetic scenes, each
with its ViSpec draft and drafts trained with the same budget for comparison. `vispec-vllm
build-demo DIR` reproduces them.

- 576 image tokens per image (LLaVA-1.5's count; `vispec_vllm.demo.rich_scenes`): the default
  pair, target `scene-llava-deep-grown` (16 decoder layers against the draft's one), with drafts
  `vispec` and `eagle` (EAGLE-style on the same target-generated data, same budget).
- `scene-llava-deep`: the default target before its last 3,000 training steps (docs/experiments.md);
  `build-demo` trains the default target on from it. It ships without drafts.
- 36 image tokens per image (`vispec_vllm.demo.scenes`): the first demo pair, which most engine
  tests use because it is fast.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
# The 36-token pair.
DEMO_TARGET = DEMO_DIR / "scene-llava"
DEMO_DRAFTS = {
    "vispec": DEMO_DIR / "scene-llava-vispec",
    "eagle": DEMO_DIR / "scene-llava-eagle",
    "vispec-no-adaptor": DEMO_DIR / "scene-llava-vispec-no-adaptor",
}
# The 576-token pair (LLaVA-1.5 scale, a real VLM's depth ratio).
DEEP_TARGET = DEMO_DIR / "scene-llava-deep-grown"
DEEP_DRAFTS = {kind: DEMO_DIR / f"scene-llava-deep-grown-{kind}" for kind in ("vispec", "eagle")}
# Image tokens per image -> (target, drafts).
DEMO_PAIRS = {36: (DEMO_TARGET, DEMO_DRAFTS), 576: (DEEP_TARGET, DEEP_DRAFTS)}
DEFAULT_IMAGE_TOKENS = 576

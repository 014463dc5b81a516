"""The package a user installs: a wheel built from the checkout (`pip wheel --no-deps .`), installed
into a fresh virtual environment outside the checkout, must hold every module and run every command.

An editable install (what the set-up script makes) hides a subpackage that the distribution leaves
out; this test does not: the fresh environment sees the installed wheel and, for vLLM and the other
dependencies, the test environment's site-packages by path (not its `.pth` hooks, so not the
editable checkout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("serve", "bench", "tiny-models", "demo", "train", "build-demo")
# What a build needs from the checkout; the rest (.venv, build output, float32 demo builds) stays.
NOT_SOURCES = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "fp32", ".*_cache")

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import vispec_vllm
site = sys.argv[1]
names = ["vispec_vllm", *(m.name for m in pkgutil.walk_packages(vispec_vllm.__path__, "vispec_vllm."))]
for name in names:
    module = importlib.import_module(name)
    assert module.__file__.startswith(site), (name, module.__file__)
print(len(names), "modules")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh environment's bin folder, its site-packages) with the wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    # --no-build-isolation: build with this environment's setuptools (no index needed at test time).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(source)], check=True, cwd=work)
    (wheel,) = (work / "dist").glob("vispec_vllm-*.whl")
    env_dir = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    # vLLM, torch and transformers from this environment, after the wheel on sys.path.
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # As the set-up script does on CPU machines, from the installed package (see torchvision_compat).
    subprocess.run([python, "-c", "from vispec_vllm.torchvision_compat import install; install()"], check=True,
                   cwd=work)
    return env_dir / "bin", site


def run(command: list, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_has_every_subpackage(installed):
    _, site = installed
    shipped = {path.parent.relative_to(site).as_posix() for path in (site / "vispec_vllm").rglob("__init__.py")}
    in_checkout = {path.parent.relative_to(REPO).as_posix() for path in (REPO / "vispec_vllm").rglob("__init__.py")}
    in_checkout.add("vispec_vllm/patches")  # patches/ ships as vispec_vllm.patches
    assert shipped == in_checkout
    assert not list((site / "vispec_vllm" / "demo" / "models").glob("fp32")), "float32 build folders ship"


def test_every_command_answers_help(installed, tmp_path):
    bin_dir, _ = installed
    assert "tiny-models" in run([bin_dir / "vispec-vllm", "--help"], tmp_path).stdout
    for subcommand in SUBCOMMANDS:
        assert run([bin_dir / "vispec-vllm", subcommand, "--help"], tmp_path).stdout.strip(), subcommand


def test_every_module_imports_from_the_wheel(installed, tmp_path):
    bin_dir, site = installed
    assert "modules" in run([bin_dir / "python", "-c", IMPORT_EVERY_MODULE, str(site)], tmp_path).stdout


def test_installed_command_writes_tiny_models(installed, tmp_path):
    bin_dir, _ = installed
    out = run([bin_dir / "vispec-vllm", "tiny-models", tmp_path / "models"], tmp_path).stdout
    written = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert {"tiny-llava", "tiny-qwen2_5_vl"} <= set(written)
    for path in written.values():
        assert (Path(path) / "config.json").exists() and list(Path(path).glob("*.safetensors")), path

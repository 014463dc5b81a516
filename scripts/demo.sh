#!/usr/bin/env bash
# The main job on the embedded default: set-up if needed, then `vispec-vllm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec .venv/bin/vispec-vllm demo "$@"

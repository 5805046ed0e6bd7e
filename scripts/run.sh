#!/usr/bin/env bash
# Install everything (idempotent) and run the main job on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m programs.generate --model smollm2-135m-instruct --prompt "What is 7 times 8?" "$@"

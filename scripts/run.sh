#!/usr/bin/env bash
# Install everything (idempotent) and run the main job: LoRA SFT of the embedded SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m programs.sft --config configs/sft-lora-smollm2.yaml --overwrite "$@"

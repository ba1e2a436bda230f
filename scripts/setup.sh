#!/usr/bin/env bash
# Creates .venv and installs Tarragon with its test extras. Idempotent; fast when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # The CPU wheel, pinned: an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check "torch==${TARRAGON_TORCH_VERSION:-2.13.0}"
fi
EXTRAS=test
if ! .venv/bin/python -c "import tarragon, transformers, pytest, pytest_timeout, fastapi, openai, hypothesis, ray" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.tarragon-installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
  touch .venv/.tarragon-installed
fi

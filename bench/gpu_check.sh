#!/usr/bin/env bash
# The GPU check (issue 7): parity, an EW and an AW failover, throughput, on a GPU-sized model.
# Runs on a GPU machine's own torch, downloads nothing, finishes in a few minutes on one H100/H200.
# Pure-Python dependencies missing there (pyzmq, msgspec, safetensors, tokenizers, tqdm, jinja2)
# are installed from wheels in .whl/ when that folder exists. Extra arguments go to gpu_check.py
# (e.g. --out, --size); `bench/gpu_check.sh --device cpu --size tiny` checks the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/tarragon-site .whl/*.whl
  export PYTHONPATH=/tmp/tarragon-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout 470 "$PY" bench/gpu_check.py "$@"

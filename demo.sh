#!/usr/bin/env bash
# Sets up, then generates on the demo model (random weights) with the default shape (2 attention + 2 expert workers).
#   ./demo.sh [--failover] [--model DIR] [PROMPT...]   text and tokens/s (+ an expert, then an attention worker
#                                                      killed mid-way, and the latter under --recovery restart)
#   ./demo.sh serve [--port 8000] [--api-key KEY]       the OpenAI-compatible server on the same cluster
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
if [ "${1:-}" = "serve" ]; then
  shift
  exec .venv/bin/tarragon serve "$@"
fi
exec .venv/bin/tarragon generate "$@"

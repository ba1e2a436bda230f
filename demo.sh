#!/usr/bin/env bash
# Sets up, then generates on the demo model with 2 attention and 3 expert workers.
# Extra arguments go to `tarragon generate` (e.g. --model DIR, prompts).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/tarragon generate --attention-workers 2 --expert-workers 3 "$@"

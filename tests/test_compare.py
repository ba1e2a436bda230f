"""bench/compare_vllm.py's short form: Tarragon (every resilience mechanism on, the fast paths:
packed expert and LM-head weights, steps in flight per micro-batch group) against transformers on
the bench model, batched: the same greedy tokens for every request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_compare_short_tokens_agree_with_transformers(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/compare_vllm.py"), "--short", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["token_agreement"] == {"tarragon 1x1": 1.0, "transformers": 1.0}
    assert all(v > 0 for v in result["median_tok_s"]["tarragon 1x1"].values())
    assert "aw0" in result["cpu_ms_per_step"]["tarragon 1x1"]["8"]

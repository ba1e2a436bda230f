"""bench/compare_vllm.py's and bench/compare_served.py's short forms. compare_vllm: Tarragon (every
resilience mechanism on, the fast paths: packed expert and LM-head weights, steps in flight per
micro-batch group) against transformers on the bench model, batched: the same greedy tokens for
every request. compare_served: the served figures of `tarragon serve` in its default shape."""

from __future__ import annotations

import json
import re
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


def test_compare_served_short_every_request_finishes(tmp_path):
    """bench/compare_served.py's short form: a `tarragon serve` in the shape it chooses, driven by
    the bench client at two rates; every request gets all its tokens and each cell has real ITLs."""
    out = tmp_path / "served.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/compare_served.py"), "--short", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["engines"] == ["tarragon"] and result["rates"] == ["inf", "8"]
    assert re.fullmatch(r"\d+x\d+", result["tarragon_shapes"]["tarragon"])
    cells = result["median"]["tarragon"]
    assert set(cells) == {"inf", "8"} and result["all_finished"]
    for cell in cells.values():
        assert cell["finished"] == cell["requests"] == 16
        assert cell["output_tok_s"] > 0 and 0 < cell["itl_p50_ms"] <= cell["itl_p99_ms"] and cell["ttft_p50_ms"] > 0


def test_step_timeline_short_accounts_for_each_layer_trip(tiny_models, tmp_path):
    """bench/step_timeline.py's short form: every worker's phases recorded on the shared clock;
    each MoE layer's trip to the expert workers and back has all its legs, and they fit in a step;
    the expert workers that serve are the ones the packed shape sends to."""
    out = tmp_path / "timeline.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/step_timeline.py"), "--short", "--model", tiny_models["mixtral"],
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"1", "16"}
    for r in results.values():
        assert r["steps"] >= 16 and r["step_ms"] > 0
        assert len(r["ew_serving_ms_per_step"]) == 2
        legs = r["layer_us"]
        assert set(legs) == {"dispatch", "to EW", "EW serves", "back"} and all(v > 0 for v in legs.values())
        assert sum(legs.values()) / 1e3 < r["step_ms"] and 0 < r["messaging_share"] < 1
    # Packed, a batch of up to eight goes to the first expert worker alone; sixteen spread over both.
    assert sorted(v > 0 for v in results["1"]["ew_serving_ms_per_step"].values()) == [False, True]
    assert all(v > 0 for v in results["16"]["ew_serving_ms_per_step"].values())

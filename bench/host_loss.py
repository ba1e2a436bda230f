"""Detection time and stall when a host vanishes: runs tests/test_host_loss.py (every worker on a
network host of its own, joined over TCP; needs root and iproute2) and prints its figures.

    sudo .venv/bin/python bench/host_loss.py [--out docs/results/host_loss.json]

detected_s: from the cut to the orchestrator's worker_failed event; stall_s: the largest gap
between two tokens of any stream after the cut (the failure-free gap is one decode step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs/results/host_loss.json"))
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = dict(os.environ, HOST_LOSS_RESULTS=f.name, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests/test_host_loss.py")], env=env, cwd=ROOT).returncode
        results = json.loads(Path(f.name).read_text() or "{}")
    print(f"\n{'case':42s} {'detected':>9s} {'stall':>7s}  how")
    for case, r in results.items():
        detected = f"{r['detected_s']:.3f}" if r["detected_s"] is not None else "-"
        print(f"{case:42s} {detected:>9s} {r['stall_s']:7.3f}  {r['how']}")
    Path(args.out).write_text(json.dumps({"command": "sudo .venv/bin/python bench/host_loss.py", "tests_rc": rc,
                                          "cases": results}, indent=1) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()

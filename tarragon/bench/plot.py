"""The timeline of a run as a PNG: output tokens/s and token gaps over time, each fault marked with
its stall and replacement window.

Its own module because it is the only part that needs matplotlib (optional: `tarragon[bench]`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from ..faults import FaultAction, stall_s
from ..vocabulary import EventKind
from .client import BenchRun

BIN_S = 0.25  # timeline bin width


def timeline(run: BenchRun) -> dict[str, Any]:
    """Output tokens/s in BIN_S bins and each inter-chunk gap at its arrival, from the run's start
    (a chunk carries output_len / chunks tokens: almost always one); per fault, its time, label,
    stall and replacement window; the failure-free rate (median of the bins before the first fault)."""
    end = run.end - run.start
    bins = [0.0] * (int(end / BIN_S) + 1)
    itl_t, itl = [], []
    for r in run.requests:
        if not r.chunk_times:
            continue
        per_chunk = r.output_len / len(r.chunk_times) if r.ok else 1.0
        for j, t in enumerate(r.chunk_times):
            bins[min(int((t - run.start) / BIN_S), len(bins) - 1)] += per_chunk / BIN_S
            if j:
                itl_t.append(t - run.start)
                itl.append(1000 * (t - r.chunk_times[j - 1]))
    faults = []
    for f in run.faults:
        if f.error:
            continue
        streams = [r.chunk_times for r in run.requests if r.chunk_times and r.chunk_times[0] < f.client_t < r.end]
        ready = [e["t"] for e in (run.server or {}).get("events", [])
                 if e["kind"] == EventKind.REPLACEMENT_READY and e["t"] > f.server_t and e["detail"].endswith(f" {f.victim}")]
        faults.append({"t": f.client_t - run.start, "label": f"{'SIGSTOP' if f.fault.action == FaultAction.HANG else 'SIGKILL'} {f.victim}",
                       "stall_ms": 1000 * stall_s(streams, f.client_t),
                       "replaced_t": f.client_t - run.start + (min(ready) - f.server_t) if ready else None})
    first = min((f["t"] for f in faults), default=end)
    before = [v for t, v in zip([BIN_S * i for i in range(len(bins))], bins) if t + BIN_S <= first and v > 0]
    return {"t": [BIN_S * i for i in range(len(bins))], "tokens_per_s": bins, "itl_t": itl_t, "itl_ms": itl, "faults": faults,
            "baseline": statistics.median(before) if before and faults else None}


def plot_timelines(panels: list[tuple[str, BenchRun]], path: str | Path, title: str = "") -> bool:
    """One column per run: output tokens/s (top) and inter-token latency (bottom) over time, both
    from 0; each fault a red line with its stall written beside it, its replacement window shaded,
    the failure-free rate dashed. False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'tarragon[bench]'): no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels) + 1, 5.5), sharex="col", sharey="row", squeeze=False)
    for col, (name, run) in enumerate(panels):
        tl = timeline(run)
        top, bottom = axes[0][col], axes[1][col]
        top.step(tl["t"], tl["tokens_per_s"], where="post", lw=1, label="output tokens/s")
        if tl["baseline"]:
            top.axhline(tl["baseline"], color="grey", ls=":", lw=1, label=f"failure-free: {tl['baseline']:.0f} tokens/s")
        bottom.scatter(tl["itl_t"], tl["itl_ms"], s=2, alpha=0.5)
        for i, f in enumerate(tl["faults"]):
            for ax in (top, bottom):
                ax.axvline(f["t"], color="red", ls="--", lw=1)
                ax.axvspan(f["t"], f["replaced_t"] or tl["t"][-1] + BIN_S, color="orange", alpha=0.15, lw=0,
                           label="until the replacement is ready" if ax is top and i == 0 else None)
            top.annotate(f["label"], (f["t"], 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                         fontsize=7, color="red")
            bottom.annotate(f"stall {f['stall_ms']:.0f} ms", (f["t"], f["stall_ms"]), xytext=(4, 0), textcoords="offset points",
                            fontsize=7, color="red", va="center")
        top.set_ylim(bottom=0)
        bottom.set_ylim(bottom=0)
        top.set_title(name, fontsize=10)
        top.legend(fontsize=7, loc="lower left")
        bottom.set_xlabel("time since the start (s)")
    axes[0][0].set_ylabel(f"output tokens/s ({int(1000 * BIN_S)} ms bins)")
    axes[1][0].set_ylabel("gap between tokens (ms)")
    fig.suptitle(title or "Output tokens/s and token gaps while workers fail", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


"""A worker's timeline of its step's phases, for profiling the critical path across processes
(`bench/step_timeline.py`). Off unless the environment names a folder: TARRAGON_TIMELINE=DIR.

Each traced call is recorded as (phase, start, end, thread CPU), start and end on CLOCK_MONOTONIC,
which every process on the machine shares, so an attention worker's dispatch, the expert worker's
pass over it and the reply's arrival line up in one timeline. The wrappers are put on the classes
at start-up (nothing in the datapath knows about them); a thread writes the last events to
DIR/NAME.tsv every second (a worker is killed at shutdown, there is no orderly exit to wait for).
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time

ENV = "TARRAGON_TIMELINE"
KEEP = 50_000  # events kept (and written) per worker
# role -> (module, attribute path, phase): what a decode step spends its time on, per role.
PHASES: dict[str, list[tuple[str, str, str]]] = {
    "attention": [
        ("model_runner", "ModelRunner.prepare", "prepare"),
        ("model", "AttentionModel.attention", "attention"),
        ("model", "AttentionModel.route", "route"),
        ("forwarding_engine", "ForwardingEngine.dispatch", "dispatch"),
        ("forwarding_engine", "ForwardingEngine._accept", "accept"),
        ("forwarding_engine", "ExpertFuture.result", "wait_combine"),
        ("model_runner", "ModelRunner._finish", "lm_head_sample"),
        ("attention_worker", "AttentionWorker.finish_step", "finish_step"),
    ],
    "expert": [("expert_worker", "serve_batch", "serve")],
}


def install(role: str, name: str) -> None:
    """Trace this worker's phases if TARRAGON_TIMELINE is set."""
    folder = os.environ.get(ENV)
    if not folder or role not in PHASES:
        return
    events: list[tuple[str, int, int, int]] = []
    for module, path, phase in PHASES[role]:
        owner = importlib.import_module(f"{__package__}.{module}")
        *outer, attr = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, attr, _traced(getattr(owner, attr), phase, events))
    threading.Thread(target=_writer, args=(os.path.join(folder, f"{name}.tsv"), events), daemon=True).start()


def _traced(fn, phase: str, events: list):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            events.append((phase, t0, time.monotonic_ns(), time.thread_time_ns() - c0))
            if len(events) > 2 * KEEP:
                del events[:KEEP]
    return traced


def _writer(path: str, events: list) -> None:
    while True:
        time.sleep(1.0)
        rows = "".join(f"{p}\t{a}\t{b}\t{c}\n" for p, a, b, c in events[-KEEP:])
        with open(path + ".tmp", "w") as f:
            f.write(rows)
        os.replace(path + ".tmp", path)

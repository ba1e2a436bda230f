"""Entry point of every worker process: `python -m tarragon.worker SPEC_JSON`.

Imports only torch, safetensors, zmq and msgspec (never transformers), so workers start fast.
A worker dies with the process that launched it: Linux's parent-death signal covers a parent
killed by SIGKILL, and the parent pid check covers a parent that died before the signal was set.

Beside its main loop every worker runs a liveness thread: it answers probes at once (peers probe
a worker that owes them a reply and stays silent) and sends the orchestrator heartbeats. A
stopped process (SIGSTOP) does neither, so it is detected like a dead one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

import msgspec

from .config import EngineConfig
from .routing_table import RoutingTable


class WorkerSpec(msgspec.Struct, kw_only=True):
    name: str
    role: str  # "attention" | "expert" | "store"
    model_dir: str
    dtype: str
    device: str
    orch_endpoint: str
    probe_endpoint: str
    parent_pid: int
    threads: int = 1
    heartbeat_s: float = 0.05
    endpoint: str = ""  # expert worker: where it binds
    experts: list[tuple[int, int]] = []  # expert worker: (layer, expert) pairs it loads
    shadow_experts: list[tuple[int, int]] = []  # expert worker: which of them are shadows
    store_endpoint: str = ""  # attention worker: the checkpoint store ("" = no checkpointing)
    store_max_bytes: int = 1 << 30  # checkpoint store: its memory budget
    driver_endpoint: str = ""  # attention worker: where requests come from
    expert_endpoints: dict[str, str] = {}  # attention worker: expert worker name -> endpoint
    probe_endpoints_of_experts: dict[str, str] = {}  # attention worker: where to probe each one
    table: RoutingTable | None = None  # attention worker: its routing table
    engine: EngineConfig | None = None
    probe_interval_s: float = 0.01
    probe_timeout_s: float = 0.1
    nice: int = 0  # replacements start at idle CPU priority, so serving workers keep their cores


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def restore_priority(spec: WorkerSpec) -> None:
    """Once loaded, a replacement serves at normal priority (needs privileges; else stays low)."""
    if spec.nice:
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except (AttributeError, OSError):
            pass


def start_liveness(ctx, name: str, probe_endpoint: str, orch_endpoint: str, heartbeat_s: float) -> threading.Thread:
    import zmq

    from . import protocol as P

    probe = ctx.socket(zmq.ROUTER)
    probe.setsockopt(zmq.LINGER, 0)
    probe.bind(probe_endpoint)
    hb = ctx.socket(zmq.DEALER)
    hb.setsockopt(zmq.IDENTITY, f"{name}#hb".encode())
    hb.setsockopt(zmq.LINGER, 0)
    hb.connect(orch_endpoint)
    beat = P.encode(P.Heartbeat(name))

    def loop() -> None:
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                hb.send_multipart(beat)
                next_beat = now + heartbeat_s
            if probe.poll((next_beat - now) * 1000):
                frames = probe.recv_multipart()
                try:
                    msg, _ = P.decode(frames[1:])
                except P.BadMessage:
                    continue
                if isinstance(msg, P.Probe):
                    probe.send_multipart([frames[0], *P.encode(P.Pong(msg.seq))])

    t = threading.Thread(target=loop, name="liveness", daemon=True)
    t.start()
    return t


def main(argv: list[str]) -> None:
    spec = msgspec.json.decode(argv[0], type=WorkerSpec)
    die_with_parent(spec.parent_pid)
    if spec.nice:  # start-up (imports, weight loading) only in CPU time nobody else wants
        os.nice(spec.nice)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {spec.name} %(levelname)s %(message)s")
    import torch
    import zmq

    torch.set_num_threads(spec.threads)
    ctx = zmq.Context()
    orch = ctx.socket(zmq.DEALER)
    orch.setsockopt(zmq.IDENTITY, spec.name.encode())
    orch.setsockopt(zmq.LINGER, 1000)
    orch.connect(spec.orch_endpoint)
    start_liveness(ctx, spec.name, spec.probe_endpoint, spec.orch_endpoint, spec.heartbeat_s)
    if spec.role == "expert":
        from .expert_worker import run
    elif spec.role == "store":
        from .checkpoint_store import run
    else:
        from .attention_worker import run
    try:
        run(spec, ctx, orch)
    except Exception:
        logging.exception("worker failed")
        os._exit(1)
    os._exit(0)  # the liveness thread's sockets need no orderly close


if __name__ == "__main__":
    main(sys.argv[1:])

"""Entry point of every worker process: `python -m tarragon.worker SPEC_JSON`.

Imports only torch, safetensors, zmq and msgspec (never transformers), so workers start fast.
A worker dies with the process that launched it: Linux's parent-death signal covers a parent
killed by SIGKILL, and the parent pid check covers a parent that died before the signal was set.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import msgspec

from .config import EngineConfig
from .routing_table import RoutingTable


class WorkerSpec(msgspec.Struct, kw_only=True):
    name: str
    role: str  # "attention" | "expert"
    model_dir: str
    dtype: str
    device: str
    driver_endpoint: str
    parent_pid: int
    threads: int = 1
    endpoint: str = ""  # expert worker: where it binds
    experts: list[tuple[int, int]] = []  # expert worker: (layer, expert) pairs it serves
    expert_endpoints: dict[str, str] = {}  # attention worker: expert worker name -> endpoint
    table: RoutingTable | None = None  # attention worker: its routing table
    engine: EngineConfig | None = None


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def main(argv: list[str]) -> None:
    spec = msgspec.json.decode(argv[0], type=WorkerSpec)
    die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {spec.name} %(levelname)s %(message)s")
    import torch
    import zmq

    torch.set_num_threads(spec.threads)
    ctx = zmq.Context()
    control = ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.IDENTITY, spec.name.encode())
    control.setsockopt(zmq.LINGER, 1000)
    control.connect(spec.driver_endpoint)
    if spec.role == "expert":
        from .expert_worker import run
    else:
        from .attention_worker import run
    try:
        run(spec, ctx, control)
    finally:
        ctx.destroy(linger=0)


if __name__ == "__main__":
    main(sys.argv[1:])

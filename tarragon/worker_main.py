"""Entry point of every worker process: `python -m tarragon.worker_main SPEC_JSON` (the local
launcher), a Ray actor's `run` (the Ray launcher), or `tarragon worker --join ADDR` (by hand).

It sets up what every worker shares (see worker.py: dying with the driver, the liveness thread,
the channel to the orchestrator), then runs its role's main loop, looked up in `ROLES`.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Protocol

import msgspec
import zmq

from . import protocol as P
from . import timeline
from .sockets import ClusterKey, Context, make_socket, recv
from .vocabulary import Role
from .worker import (OrchestratorChannel, WorkerSpec, await_zmq_threads, cluster_key, die_with_driver, die_with_parent,
                     host_towards, keep_freed_memory, may_raise_priority, reserve_endpoints, serving_policy, start_liveness)


class RoleMain(Protocol):
    def __call__(self, spec: WorkerSpec, ctx: Context, orch: OrchestratorChannel) -> None:
        """Serve as this role until the orchestrator says `Shutdown`."""


# The module of each role's `run`. Imported only once the process has lowered its priority (a
# replacement loads in CPU time nobody else wants), and only its own (a store loads no model code).
ROLES: dict[Role, str] = {Role.ATTENTION: "attention_worker", Role.EXPERT: "expert_worker", Role.STORE: "checkpoint_store"}
JOIN_REPEAT_S = 2.0  # a joiner repeats its offer this often until it is given a slot


def role_main(role: Role) -> RoleMain:
    return importlib.import_module(f"{__package__}.{ROLES[Role(role)]}").run


def lower_priority(nice: int) -> None:
    """Start-up (imports, weights) only in CPU time nobody else wants; `restore_priority` undoes it."""
    if nice and may_raise_priority(nice):
        os.nice(nice)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass


def serve(spec: WorkerSpec, key: ClusterKey | None) -> int:
    """Run one worker until the orchestrator shuts it down; returns its exit status. How the
    process then ends is the caller's business (a subprocess exits, a Ray actor reports it)."""
    lower_priority(spec.nice)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {spec.name} %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(spec.threads)
    keep_freed_memory()
    timeline.install(Role(spec.role).value, spec.name)  # profiling only: TARRAGON_TIMELINE=DIR
    ctx = Context(key)
    orch = OrchestratorChannel(ctx, spec.name, spec.orch_endpoint)
    drain = threading.Event()
    if threading.current_thread() is threading.main_thread():  # (a Ray actor's thread cannot set handlers)
        signal.signal(signal.SIGTERM, lambda *_: drain.set())
    start_liveness(ctx, spec.name, spec.probe_endpoint, spec.orch_endpoint, spec.heartbeat_s, orch, drain)
    if not spec.nice:  # (a replacement takes its policy once loaded: restore_priority)
        await_zmq_threads(ctx)
        serving_policy(Role(spec.role))
    try:
        role_main(spec.role)(spec, ctx, orch)
    except Exception:
        logging.exception("worker failed")
        return 1
    return 0


def join(address: str, role: Role, key: ClusterKey | None, host: str | None = None, timeout_s: float = 600.0) -> int:
    """`tarragon worker --join ADDR --key-file F`: offer this process to the orchestrator at ADDR
    for a planned slot of `role`, then serve as the worker it assigns; returns the exit status.
    Without the cluster's key (None: an insecure cluster) the orchestrator never hears it."""
    endpoint, probe_endpoint, _held = reserve_endpoints(host or host_towards(address))  # held while this runs
    ctx = Context(key)
    s = make_socket(ctx, zmq.DEALER, connect=address, identity=f"join-{socket.gethostname()}-{os.getpid()}")
    msg, deadline = None, time.monotonic() + timeout_s
    while msg is None and time.monotonic() < deadline:  # repeated: a successor orchestrator never saw the first offer
        s.send_multipart(P.encode(P.Join(role, os.getpid(), endpoint, probe_endpoint)))
        if s.poll(min(JOIN_REPEAT_S, max(0.0, deadline - time.monotonic())) * 1000):
            got = recv(s, (P.Assign,), "join")
            msg = got.msg if got else None
    ctx.destroy(linger=0)
    if not isinstance(msg, P.Assign):
        print(f"tarragon worker: no {role} slot assigned by {address} within {timeout_s:.0f} s", file=sys.stderr)
        return 1
    spec = msgspec.json.decode(msg.spec, type=WorkerSpec)
    print(f"tarragon worker: joined as {spec.name}, serving on {spec.endpoint or spec.probe_endpoint}", flush=True)
    return serve(spec, key)


def main(argv: list[str]) -> None:
    spec = msgspec.json.decode(argv[0], type=WorkerSpec)
    if spec.driver_pid:
        die_with_driver(spec.driver_pid)
        if os.getppid() != spec.parent_pid:
            os._exit(1)
    else:
        die_with_parent(spec.parent_pid)
    os._exit(serve(spec, cluster_key(spec)))  # the liveness thread's sockets need no orderly close


if __name__ == "__main__":
    main(sys.argv[1:])

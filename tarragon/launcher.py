"""Launchers: how the orchestrator gets a worker process, and where that worker can be reached.

Three fit the same `Launcher` protocol, so the orchestrator treats them alike:
- `LocalLauncher` (the default): every worker a child process on this machine, on IPC sockets;
- `RayLauncher` (`ray_launcher.py`): every worker a Ray actor that Ray places on a node, on TCP;
- `ManualLauncher`: workers started by hand (`tarragon worker --join ADDR`) fill planned slots.
Each hands back a `WorkerHandle`: the part of `subprocess.Popen` the orchestrator uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec

from . import protocol as P
from .vocabulary import Role
from .worker import WorkerSpec


class WorkerHandle(Protocol):
    """A started worker: `subprocess.Popen` is one; the Ray and manual launchers give look-alikes."""

    pid: int  # 0 while not known yet (a Ray actor being placed, a slot nobody has joined)
    returncode: int | None

    def poll(self) -> int | None: ...  # None while it runs
    def kill(self) -> None: ...  # fence it: a hung worker must never come back
    def wait(self, timeout: float | None = None) -> int: ...  # raises subprocess.TimeoutExpired


class Launcher(Protocol):
    def start_worker(self, spec: WorkerSpec, node: str = "") -> WorkerHandle:
        """Start a worker of `spec` (on `node`, where the launcher places workers); the launcher
        fills in the addresses the worker binds when the spec leaves them empty."""
        ...

    def endpoint(self, name: str) -> str | None:
        """Where a started worker serves (None: not known yet)."""
        ...

    def probe_endpoint(self, name: str) -> str | None: ...

    def log_tail(self, name: str, lines: int = 15) -> str: ...


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a stopped process is alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class AdoptedProcess:
    """A local worker started by a predecessor orchestrator: not this process's child (its parent
    died), so it is watched and fenced by pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not pid_alive(self.pid):
            self.returncode = -signal.SIGKILL  # its real status went to whoever reaped it
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        return self.returncode


class LocalLauncher:
    def __init__(self, run_dir: str | Path, gpus: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.gpus = gpus or []  # device="cuda": GPU workers take these in turn, one each while they last
        self.started_on_gpu = 0

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.run_dir / name}.sock"

    def probe_endpoint(self, name: str) -> str:
        return self.endpoint(f"{name}-probe")

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start_worker(self, spec: WorkerSpec, node: str = "") -> subprocess.Popen:
        spec = msgspec.structs.replace(spec, endpoint=spec.endpoint or self.endpoint(spec.name),
                                       probe_endpoint=self.probe_endpoint(spec.name))
        return self.start("tarragon.worker_main", spec.name, spec, spec.threads, self.gpu_env(spec))

    def gpu_env(self, spec: WorkerSpec) -> dict[str, str]:
        """Each GPU worker sees one GPU of its own (in turn; shared once there are more workers)."""
        if spec.device != "cuda" or spec.role == Role.STORE or not self.gpus:  # the store keeps KV in host memory
            return {}
        self.started_on_gpu += 1
        return {"CUDA_VISIBLE_DEVICES": self.gpus[(self.started_on_gpu - 1) % len(self.gpus)]}

    def start(self, module: str, name: str, spec: msgspec.Struct, threads: int = 1, extra_env: dict | None = None) -> subprocess.Popen:
        """Start `python -m module SPEC_JSON`, its output going to `<run_dir>/<name>.log`."""
        env = dict(os.environ, **(extra_env or {}))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        # Idle OpenMP threads sleep instead of spinning: workers take turns on the same cores.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Weights and KV in transparent huge pages (glibc's malloc asks for them, THP "madvise"):
        # a step streams tens of MB of weights, a TLB miss every 4 KB otherwise.
        tunables = env.get("GLIBC_TUNABLES", "")
        if "glibc.malloc.hugetlb" not in tunables:
            env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, "glibc.malloc.hugetlb=1") if t)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with open(self.log_path(name), "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", module, msgspec.json.encode(spec).decode()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the driver, which shuts workers down in order
            )

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class JoinedWorker:
    """A slot for a worker started by hand. There is no process to watch: its failure is seen by
    heartbeats (and by its peers' probes); fencing asks it to shut down, should it ever wake up.
    Its pid stays 0: the pid a joiner claims is never believed, so nothing signals it by pid."""

    def __init__(self, spec: WorkerSpec, send: Callable[[str, P.Msg], None]):
        self.spec, self.send = spec, send
        self.pid = 0
        self.joined = False
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.send(self.spec.name, P.Shutdown())
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode or 0  # its exit is its own host's business


class ManualLauncher:
    """Planned slots wait for workers that join (`tarragon worker --role R --join ADDR`): each
    joiner fills the oldest open slot of its role, at the addresses it reserved on its host."""

    def __init__(self, send: Callable[[str, P.Msg], None]):
        self.send = send
        self.slots: dict[str, JoinedWorker] = {}  # by worker name, joined or not
        self.joiners: list[tuple[str, P.Join]] = []  # (identity, offer) waiting for a slot of their role
        self.assigned: set[str] = set()  # joiners given a slot: their repeated offers are stale

    def start_worker(self, spec: WorkerSpec, node: str = "") -> JoinedWorker:
        self.slots[spec.name] = slot = JoinedWorker(spec, self.send)
        self.match()
        return slot

    def adopt(self, spec: WorkerSpec) -> JoinedWorker:
        """A worker that joined a predecessor orchestrator: its slot, filled (a successor's)."""
        self.slots[spec.name] = slot = JoinedWorker(spec, self.send)
        slot.joined = True
        return slot

    def join(self, identity: str, offer: P.Join) -> None:
        if identity in self.assigned or any(i == identity for i, _ in self.joiners) or len(self.joiners) >= 64:
            return  # a joiner's offer is queued once (it repeats it until assigned); a flood of offers is not queued
        self.joiners.append((identity, offer))
        self.match()

    def match(self) -> None:
        for slot in self.slots.values():
            joiner = next((j for j in self.joiners if j[1].role == slot.spec.role), None)
            if slot.joined or joiner is None:  # filled already, or nobody to fill it
                continue
            self.joiners.remove(joiner)
            identity, offer = joiner
            self.assigned.add(identity)
            slot.joined = True
            slot.spec = msgspec.structs.replace(slot.spec, endpoint=slot.spec.endpoint or offer.endpoint,
                                                probe_endpoint=offer.probe_endpoint)
            self.send(identity, P.Assign(msgspec.json.encode(slot.spec).decode()))

    def endpoint(self, name: str) -> str | None:
        slot = self.slots.get(name)
        return slot.spec.endpoint if slot and slot.joined else None

    def probe_endpoint(self, name: str) -> str | None:
        slot = self.slots.get(name)
        return slot.spec.probe_endpoint if slot and slot.joined else None

    def log_tail(self, name: str, lines: int = 15) -> str:
        return ""  # on the worker's own host


def control_host(launcher: str, ray_address: str | None, join_address: str | None, cpus: int) -> tuple[str, str, bool]:
    """Where the driver and orchestrator bind for a launcher: (host, Ray's GCS address, whether
    Ray was started here). Local: "" (IPC in the run folder); manual: the join address's host;
    ray: 127.0.0.1 on a one-host cluster, else this node's address."""
    if launcher == "local":
        return "", "", False
    if launcher == "manual":
        if not (join_address or "").startswith("tcp://"):
            raise ValueError("launcher='manual' needs join_address='tcp://HOST:PORT' (where workers join)")
        return join_address.removeprefix("tcp://").rsplit(":", 1)[0], "", False
    if launcher != "ray":
        raise ValueError(f"launcher must be 'local', 'ray' or 'manual', not {launcher!r}")
    try:
        from .ray_launcher import connect
    except ImportError:
        raise ValueError("launcher='ray' needs Ray: pip install 'tarragon[ray]'") from None
    gcs, host, started = connect(ray_address, cpus)
    return host, gcs, started

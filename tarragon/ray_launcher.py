"""Ray launcher: every worker is a Ray actor, one process each, that Ray places on a node.

Ray does placement and process lifecycle; the datapath stays ours (ZMQ over TCP, point to point),
so a dead worker still breaks nothing but its own connections. A worker's place is given by Ray
resources: `threads` CPUs, a GPU when the device is CUDA, and its node, named by a resource only
that node has (Ray gives every node `node:<ip>`; `ray start --resources '{"rack-a": 1}'` adds
your own).

Addresses: an actor reserves two ports on its node as it starts (`worker.reserve_endpoints`) and
reports them; the orchestrator reads them when a peer needs them. Everything binds 127.0.0.1
while the whole Ray cluster is this host, else each node's own address.

Lifetime: the orchestrator creates the actors, so it owns them, and Ray kills an owner's actors
when the owner dies; the orchestrator itself dies with the driver (parent-death signal).
"""

from __future__ import annotations

import os
import signal
import subprocess

import msgspec
import ray

from .sockets import ClusterKey
from .vocabulary import Role
from .worker import WorkerSpec, reserve_endpoints
from .worker_main import serve

LOOPBACK = "127.0.0.1"


def connect(address: str | None, cpus: int) -> tuple[str, str, bool]:
    """Join the Ray cluster at `address` (None: the one this process is in, else Ray's default:
    $RAY_ADDRESS or a new local cluster with a logical CPU per worker thread). Returns its GCS
    address, the host to bind, and whether this call started Ray here."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else max(os.cpu_count() or 1, cpus),
                 include_dashboard=False, logging_level="WARNING")
    return ray.get_runtime_context().gcs_address, bind_host(), started


def bind_host() -> str:
    """127.0.0.1 while every node of the cluster is this host; else this node's address."""
    me = ray.util.get_node_ip_address()
    return LOOPBACK if {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} <= {me} else me


# No restarts: a replacement is the orchestrator's decision. Two threads: info() answers while run() runs.
@ray.remote(max_restarts=0, max_concurrency=2)
class WorkerActor:
    def __init__(self, host: str, endpoint: str):
        ip = LOOPBACK if host == LOOPBACK else ray.util.get_node_ip_address()
        self.endpoint, self.probe_endpoint, self._held = reserve_endpoints(ip, endpoint)

    def info(self) -> dict:
        """Where this worker is: its addresses, pid, node and the Ray resources it holds."""
        ctx = ray.get_runtime_context()
        return {"endpoint": self.endpoint, "probe_endpoint": self.probe_endpoint, "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources()}

    def run(self, spec_json: str, key_json: str) -> int:
        """Serve until shut down (the orchestrator watches this call as it would a process). The
        cluster key travels in the call, through Ray's own channels ("": an insecure cluster)."""
        spec = msgspec.json.decode(spec_json, type=WorkerSpec)
        key = msgspec.json.decode(key_json, type=ClusterKey) if key_json else None
        return serve(msgspec.structs.replace(spec, endpoint=self.endpoint, probe_endpoint=self.probe_endpoint), key)


class RayWorker:
    """The orchestrator's handle on one actor: Popen's interface over Ray. The actor runs while
    its `run` call is pending; that call's failure is the process's death."""

    def __init__(self, actor, spec: WorkerSpec, key: ClusterKey | None):
        self.actor = actor
        self._info = actor.info.remote()
        self._run = actor.run.remote(msgspec.json.encode(spec).decode(), msgspec.json.encode(key).decode() if key else "")
        self.returncode: int | None = None
        self.where: dict | None = None

    def placed(self) -> dict | None:
        """`info()` of the actor once Ray has started it (never blocks)."""
        if self.where is None and ray.wait([self._info], timeout=0)[0]:
            try:
                self.where = ray.get(self._info)
            except ray.exceptions.RayError:
                self.where = {}  # died before it could say; poll() tells
        return self.where or None

    @property
    def pid(self) -> int:
        return (self.placed() or {}).get("pid", 0)

    def poll(self) -> int | None:
        if self.returncode is None and ray.wait([self._run], timeout=0)[0]:
            try:
                self.returncode = ray.get(self._run)
            except ray.exceptions.RayError:  # the process died (or run raised)
                self.returncode = -9
            ray.kill(self.actor)  # a clean return leaves the process (and its heartbeats) running
        return self.returncode

    def kill(self) -> None:
        where = self.placed()
        if where and where["node_id"] == ray.get_runtime_context().get_node_id():
            try:  # on this node: fenced at once, not after a trip through Ray's control plane
                os.kill(where["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        ray.kill(self.actor)

    def wait(self, timeout: float | None = None) -> int:
        if not ray.wait([self._run], timeout=timeout)[0]:
            raise subprocess.TimeoutExpired(f"ray actor {self.actor}", timeout)
        return self.poll()


class RayLauncher:
    def __init__(self, host: str, namespace: str, key: ClusterKey | None):
        self.host, self.namespace, self.key = host, namespace, key
        self.workers: dict[str, RayWorker] = {}

    def start_worker(self, spec: WorkerSpec, node: str = "") -> RayWorker:
        resources = {node: 0.001} if node else {}
        ip = spec.endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
        if spec.endpoint and ip != LOOPBACK:  # it takes over an address: only the node that has it can
            resources[f"node:{ip}"] = 0.001
        gpus = 1 if spec.device.startswith("cuda") and spec.role != Role.STORE else 0
        actor = WorkerActor.options(name=spec.name, namespace=self.namespace, num_cpus=spec.threads, num_gpus=gpus,
                                    resources=resources).remote(self.host, spec.endpoint)
        self.workers[spec.name] = handle = RayWorker(actor, spec, self.key)
        return handle

    def endpoint(self, name: str) -> str | None:
        where = self.workers[name].placed() if name in self.workers else None
        return where["endpoint"] if where else None

    def probe_endpoint(self, name: str) -> str | None:
        where = self.workers[name].placed() if name in self.workers else None
        return where["probe_endpoint"] if where else None

    def log_tail(self, name: str, lines: int = 15) -> str:
        return ""  # actors' output goes to the orchestrator's log (Ray forwards it)

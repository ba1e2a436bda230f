"""The orchestrator: its own process, the cluster's control plane, off the datapath.

It starts every worker (through the launcher), keeps the registry, watches each worker's liveness
on its own (process exit, heartbeats), owns the authoritative routing table and pushes each new
version to the attention workers, places shadow experts, provisions replacements off the
critical path, and keeps an event log of what failed, when, what was done and how long it took.
Attention workers do not wait for it to mask a failure: they reroute on their own evidence and
report it here.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from . import protocol as P
from .config import EngineConfig
from .launcher import LocalLauncher
from .routing_table import RoutingTable
from .worker import WorkerSpec, die_with_parent

log = logging.getLogger("tarragon.orchestrator")


class ClusterSpec(msgspec.Struct, kw_only=True):
    model_dir: str
    dtype: str
    device: str
    engine: EngineConfig
    plan: RoutingTable  # version 0: expert placement over the planned expert workers
    attention_workers: int
    run_dir: str
    driver_endpoint: str
    parent_pid: int
    threads: int = 1
    heartbeat_s: float = 0.05
    heartbeat_timeout_s: float = 1.0
    probe_interval_s: float = 0.01
    probe_timeout_s: float = 0.1
    replace_failed: bool = True
    recovery: str = "tarragon"  # see llm.RECOVERY_POLICIES


@dataclass
class Worker:
    name: str
    role: str
    proc: subprocess.Popen
    spec: WorkerSpec
    slot: str  # the planned worker whose place it holds (itself, or the one it replaced)
    replacement: bool = False  # started to replace a failed worker
    state: str = "starting"
    info: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)


class Orchestrator:
    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.launcher = LocalLauncher(spec.run_dir)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = self.launcher.endpoint("orchestrator")
        self.sock.bind(self.endpoint)
        self.driver = self.ctx.socket(zmq.DEALER)
        self.driver.setsockopt(zmq.IDENTITY, b"orchestrator")
        self.driver.setsockopt(zmq.LINGER, 1000)
        self.driver.connect(spec.driver_endpoint)
        self.workers: dict[str, Worker] = {}
        self.plan = spec.plan
        ew_slots = sorted({w for row in self.plan.candidates for c in row for w in c})
        self.current: dict[str, str | None] = {w: w for w in ew_slots}  # planned EW -> live one
        self.version = 0
        self.events: collections.deque[P.Event] = collections.deque(maxlen=2000)
        self.ready_announced = False
        self.next_index = {"expert": len(ew_slots), "attention": spec.attention_workers, "store": 1}
        self.epoch = 0
        self.restart_t0 = 0.0

    # ---- workers ------------------------------------------------------------------------

    def common(self, name: str) -> dict:
        s = self.spec
        return dict(name=name, model_dir=s.model_dir, dtype=s.dtype, device=s.device, orch_endpoint=self.endpoint,
                    probe_endpoint=self.launcher.probe_endpoint(name), parent_pid=os.getpid(), threads=s.threads,
                    heartbeat_s=s.heartbeat_s, probe_interval_s=s.probe_interval_s, probe_timeout_s=s.probe_timeout_s)

    def start_expert(self, name: str, slot: str, replacement: bool = False) -> None:
        spec = WorkerSpec(role="expert", endpoint=self.launcher.endpoint(name), experts=self.plan.experts_of(slot),
                          shadow_experts=self.plan.shadows_of(slot), nice=10 if replacement else 0, **self.common(name))
        self.workers[name] = Worker(name, "expert", self.launcher.start("tarragon.worker", name, spec, self.spec.threads), spec, slot,
                                    replacement=replacement)

    def start_store(self, name: str, slot: str, replacement: bool = False) -> None:
        spec = WorkerSpec(role="store", endpoint=self.launcher.endpoint("store"), store_max_bytes=self.spec.engine.store_max_bytes,
                          nice=10 if replacement else 0, **self.common(name))
        self.workers[name] = Worker(name, "store", self.launcher.start("tarragon.worker", name, spec), spec, slot, replacement=replacement)

    def start_attention(self, name: str, slot: str, replacement: bool = False) -> None:
        live = self.live_experts()
        store = self.launcher.endpoint("store") if self.spec.engine.checkpoint else ""
        spec = WorkerSpec(role="attention", driver_endpoint=self.spec.driver_endpoint, table=self.table(), store_endpoint=store,
                          nice=10 if replacement else 0,
                          expert_endpoints={w: self.launcher.endpoint(w) for w in live},
                          probe_endpoints_of_experts={w: self.launcher.probe_endpoint(w) for w in live},
                          engine=self.spec.engine, **self.common(name))
        self.workers[name] = Worker(name, "attention", self.launcher.start("tarragon.worker", name, spec, self.spec.threads), spec, slot,
                                    replacement=replacement)

    def live_experts(self) -> list[str]:
        return [w for w in self.current.values() if w]

    def table(self) -> RoutingTable:
        return self.plan.with_workers(self.version, self.current)

    def push_table(self) -> None:
        self.version += 1
        live = self.live_experts()
        update = P.TableUpdate(self.table(), {w: self.launcher.endpoint(w) for w in live},
                               {w: self.launcher.probe_endpoint(w) for w in live})
        for w in self.workers.values():
            if w.role == "attention" and w.state in ("starting", "ready"):
                self.send(w.name, update)
        self.event("routing_updated", "", f"v{self.version}: experts on {', '.join(live)}")

    # ---- events and state -----------------------------------------------------------------

    def event(self, kind: str, worker: str, detail: str = "", ms: float = 0.0) -> None:
        self.events.append(P.Event(time.monotonic(), kind, worker, detail, ms))
        log.info("%s %s %s %s", kind, worker, detail, f"({ms:.1f} ms)" if ms else "")

    def send(self, name: str, msg: P.Msg) -> None:
        try:
            self.sock.send_multipart([name.encode(), *P.encode(msg)])
        except zmq.ZMQError:
            pass

    def publish(self) -> None:
        records = [P.WorkerRecord(w.name, w.role, w.proc.pid, w.state, w.info, w.slot if w.replacement else "")
                   for w in self.workers.values()]
        initial_ready = all(w.state == "ready" for w in self.workers.values() if not w.replacement)
        if initial_ready and not self.ready_announced and self.epoch:
            self.event("restart_ready", "", f"epoch {self.epoch}: every worker up again", (time.monotonic() - self.restart_t0) * 1000)
        self.ready_announced |= initial_ready
        self.driver.send_multipart(P.encode(P.ClusterState(records, self.version, self.ready_announced, self.epoch,
                                                           len(self.table().unavailable()))))

    # ---- failures ---------------------------------------------------------------------------

    def fail(self, name: str, reason: str, reporter: str = "", detect_ms: float = 0.0) -> None:
        w = self.workers.get(name)
        if w is None or w.state in ("failed", "stopped"):
            return
        t0 = time.monotonic()
        w.state = "failed"
        if w.proc.poll() is None:  # fence it: a hung worker must never come back
            w.proc.send_signal(signal.SIGKILL)
        self.event("worker_failed", name, f"{w.role}: {reason}" + (f" (reported by {reporter})" if reporter else ""), detect_ms)
        if self.spec.recovery == "restart":
            return self.restart_all(t0)
        if w.role == "expert":
            self.current[w.slot] = None
            self.push_table()
        if self.spec.replace_failed:
            new = f"{'ew' if w.role == 'expert' else 'aw' if w.role == 'attention' else 'store'}{self.next_index[w.role]}"
            self.next_index[w.role] += 1
            {"expert": self.start_expert, "attention": self.start_attention, "store": self.start_store}[w.role](new, w.slot, True)
            self.event("replacement_started", new, f"for {name}", (time.monotonic() - t0) * 1000)
        self.publish()

    def restart_all(self, t0: float) -> None:
        """The `restart` baseline: what engines built on collectives do when any worker dies.
        Every process is new (and newly named, so nothing from before is mistaken for it)."""
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
        self.workers.clear()
        self.version += 1
        self.epoch += 1
        self.restart_t0 = t0
        self.ready_announced = False
        self.publish()  # tell the driver first: its in-flight requests must be rerun
        self.start_all()
        self.event("restart_started", "", f"epoch {self.epoch}: every worker restarted", (time.monotonic() - t0) * 1000)

    def start_all(self) -> None:
        suffix = f"-r{self.epoch}" if self.epoch else ""
        self.start_store("store" + suffix, "store" + suffix)
        for slot in self.current:
            self.current[slot] = slot + suffix
            self.start_expert(slot + suffix, slot)
        for i in range(self.spec.attention_workers):
            self.start_attention(f"aw{i}{suffix}", f"aw{i}{suffix}")
        self.publish()

    def on_ready(self, w: Worker, msg: P.Ready) -> None:
        first = w.state != "ready"
        w.state, w.info = "ready", dict(msg.info)
        if not first:  # a periodic update (the store's byte accounting)
            return self.publish()
        if w.replacement:
            self.event("replacement_ready", w.name, f"in place of {w.slot}", (time.monotonic() - w.started) * 1000)
        if w.replacement and w.role == "expert":
            self.current[w.slot] = w.name
            self.push_table()
        elif w.role == "attention" and w.spec.table.version < self.version:
            self.push_table()  # it started with an older table
        self.publish()

    def check_liveness(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if self.workers.get(w.name) is not w:  # replaced by a restart during this loop
                continue
            if w.state in ("failed", "stopped"):
                w.proc.poll()  # reap
                continue
            if w.proc.poll() is not None:
                self.fail(w.name, f"process exited ({w.proc.returncode})")
            elif w.state == "ready" and now - w.last_beat > self.spec.heartbeat_timeout_s:
                self.fail(w.name, f"no heartbeat for {(now - w.last_beat) * 1000:.0f} ms")

    # ---- main loop --------------------------------------------------------------------------

    def run(self) -> None:
        self.start_all()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.driver, zmq.POLLIN)
        while True:
            poller.poll(timeout=10)
            # Drain everything queued before judging liveness: a heartbeat waiting in the queue
            # behind other messages (a busy moment) is a heartbeat received.
            while self.driver.poll(0):
                if not self.on_driver(self.driver.recv_multipart()):
                    return self.shutdown()
            while self.sock.poll(0):
                frames = self.sock.recv_multipart()
                self.on_worker(frames[0].decode(errors="replace"), frames[1:])
            self.check_liveness()

    def on_worker(self, sender: str, frames) -> None:
        try:
            msg, _ = P.decode(frames)
        except P.BadMessage as e:
            log.warning("dropped message from %s: %s", sender, e)
            return
        w = self.workers.get(sender.removesuffix("#hb"))
        if w is None:
            return
        w.last_beat = time.monotonic()  # any message is a sign of life (Ready may beat the first heartbeat)
        if isinstance(msg, P.Ready):
            self.on_ready(w, msg)
        elif isinstance(msg, P.WorkerFailed):
            self.fail(msg.worker, msg.reason, reporter=msg.reporter, detect_ms=msg.detect_ms)
        elif isinstance(msg, P.Report):
            self.event(msg.kind, msg.worker, msg.detail, msg.ms)

    def on_driver(self, frames) -> bool:
        try:
            msg, _ = P.decode(frames)
        except P.BadMessage as e:
            log.warning("dropped driver message: %s", e)
            return True
        if isinstance(msg, P.GetEvents):
            self.driver.send_multipart(P.encode(P.EventLog(list(self.events))))
        elif isinstance(msg, P.Report):
            self.event(msg.kind, msg.worker, msg.detail, msg.ms)
        elif isinstance(msg, P.Shutdown):
            return False
        return True

    def shutdown(self) -> None:
        for w in self.workers.values():
            if w.state not in ("failed", "stopped"):
                self.send(w.name, P.Shutdown())
        deadline = time.monotonic() + 3.0
        for w in self.workers.values():
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.state = "stopped"


def main(argv: list[str]) -> None:
    spec = msgspec.json.decode(argv[0], type=ClusterSpec)
    die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    orch = Orchestrator(spec)
    try:
        orch.run()
    finally:
        orch.ctx.destroy(linger=0)


if __name__ == "__main__":
    main(sys.argv[1:])

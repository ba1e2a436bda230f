"""The orchestrator: its own process, the cluster's control plane, off the datapath.

It starts every worker (through the launcher), keeps the registry, watches each worker's liveness
on its own (process exit, heartbeats), owns the authoritative routing table and pushes each new
version to the attention workers, places shadow experts, provisions replacements off the
critical path, and keeps an event log of what failed, when, what was done and how long it took.
Attention workers do not wait for it to mask a failure: they reroute on their own evidence and
report it here.

It is not a single point of failure: workers outlive it (they die with the driver), it publishes
its state to the driver every `publish_s` as a heartbeat, and when it dies or hangs the driver starts
a successor with the last published view (`ClusterSpec.adopt`). The successor adopts the running
workers, which re-register with it, and resumes detection and replacement.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from . import protocol as P
from .config import TarragonConfig
from .launcher import AdoptedProcess, Launcher, LocalLauncher, ManualLauncher, WorkerHandle
from .routing_table import RoutingTable
from .sockets import ClusterKey, Context, Received, drops, make_socket, recv
from .timeouts import GRAY_HEARTBEAT_MIN_S, GRAY_HEARTBEAT_SUSTAIN_S, HEARTBEAT_CAP_S, AdaptiveTimeout, GrayDetector, runnable
from .vocabulary import EventKind, RecoveryPolicy, Role, WorkerState
from .worker import WorkerSpec, die_with_parent, freeze_heap, never_preempt

log = logging.getLogger("tarragon.orchestrator")

FENCED_KEPT = 1024  # names of fenced attention workers remembered (and told to expert workers and stores)
FAILED_RETENTION_S = 10.0  # a failed worker stays in the registry (and ClusterState) this long, then goes


class ClusterSpec(msgspec.Struct, kw_only=True):
    """What the orchestrator is started with: the cluster's configuration and the driver's side."""

    config: TarragonConfig
    plan: RoutingTable  # version 0: expert placement over the planned expert workers
    run_dir: str
    driver_endpoint: str
    parent_pid: int
    host: str = ""  # ray, manual: the address the orchestrator binds (tcp)
    gpus: list[str] = []  # local launcher, device "cuda": the GPUs (CUDA_VISIBLE_DEVICES ids) workers take in turn
    publish_s: float = 0.2  # ClusterState to the driver at least this often: the orchestrator's heartbeat
    # A successor's inheritance (from the driver's last ClusterState): the workers to adopt, etc.
    adopt: list[P.WorkerRecord] = []
    table_version: int = 0
    epoch: int = 0
    next_index: dict[Role, int] = {}
    fenced: list[str] = []
    replaced: str = ""  # why the predecessor was replaced


# What each side may send the orchestrator; anything else is dropped on receipt.
FROM_WORKERS = (P.Join, P.Heartbeat, P.Ready, P.WorkerFailed, P.Report, P.Drain)
FROM_DRIVER = (P.GetEvents, P.Report, P.Shutdown, P.Handover, P.Drain, P.Drained, P.WorkerFailed)
DRAIN_GRACE_S = 0.5  # a drained expert worker, out of every routing table, gets this long to answer what it owes
DRAIN_EXIT_S = 5.0  # ... and this long to exit once told to; then it is killed
DRAIN_MAX_S = 30.0  # a drain that has not reached its shutdown by then is ended by force
LOOP_S = 0.05  # the main loop comes round at least this often (a local worker's exit wakes it at once)
CHECK_S = 0.05  # heartbeat timeouts are judged this often (an exit, a report or the driver: at once)
IN_SERVICE = (WorkerState.STARTING, WorkerState.READY)
OUT_OF_SERVICE = (WorkerState.FAILED, WorkerState.STOPPED)  # fenced or gone: never heard again
NAME_PREFIX = {Role.EXPERT: "ew", Role.ATTENTION: "aw", Role.STORE: "store"}  # + a number never used before


@dataclass
class Worker:
    name: str
    role: Role
    proc: WorkerHandle
    spec: WorkerSpec | None  # None: adopted from a predecessor
    slot: str  # the planned worker whose place it holds (itself, or the one it replaced)
    replacement: bool = False  # started to replace a failed worker
    state: WorkerState = WorkerState.STARTING
    info: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)
    failed_at: float = 0.0
    drain_t0: float = 0.0  # a planned drain: when it began
    stop_at: float = 0.0  # ... when it is to be shut down (0: not yet known)
    stop_sent: bool = False


class Orchestrator:
    def __init__(self, spec: ClusterSpec, launcher: Launcher | None = None):
        """`launcher`: how workers are started (None: the one `spec.config.cluster.launcher` names; tests give
        one that starts nothing). The orchestrator binds where it says "orchestrator" is."""
        self.spec = spec
        self.key = None if spec.config.cluster.insecure_transport else ClusterKey.load(spec.config.cluster.key_file)
        self.ctx = Context(self.key)
        self.launcher, address = (launcher, launcher.endpoint("orchestrator")) if launcher else self.make_launcher()
        self.sock = make_socket(self.ctx, zmq.ROUTER, bind=address)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.driver = make_socket(self.ctx, zmq.DEALER, connect=spec.driver_endpoint, identity="orchestrator",
                                  max_bytes=P.MAX_MESSAGE_BYTES, linger_ms=1000)
        self.workers: dict[str, Worker] = {}
        self.plan = spec.plan
        ew_slots = sorted({w for row in self.plan.candidates for c in row for w in c})
        self.current: dict[str, str | None] = {w: w for w in ew_slots}  # planned EW -> live one
        self.version = 0
        self.events: collections.deque[P.Event] = collections.deque(maxlen=2000)
        self.ready_announced = False
        self.next_index = {Role.EXPERT: len(ew_slots), Role.ATTENTION: spec.config.cluster.attention_workers,
                           Role.STORE: max(1, spec.config.resilience.stores)}
        self.epoch = 0
        self.restart_t0 = 0.0
        self.waiting: dict[str, tuple[str, bool]] = {}  # attention workers waiting for peers' addresses
        self.published = 0.0
        # Adapts to the heartbeat gaps seen from every worker: a busy machine fails nobody.
        self.heartbeat_timeout = AdaptiveTimeout(spec.config.resilience.heartbeat_timeout_s, HEARTBEAT_CAP_S)
        self.last_loop = time.monotonic()
        # A worker whose heartbeats come late (its process runs in fits: a slow AW) while its peers' do not.
        self.gray = GrayDetector("heartbeats late by", GRAY_HEARTBEAT_MIN_S, GRAY_HEARTBEAT_SUSTAIN_S)
        self.told_to_stop: dict[str, float] = {}  # worker -> the last Shutdown sent to it unasked
        self.fenced: collections.deque[str] = collections.deque(maxlen=FENCED_KEPT)  # attention workers declared failed
        self.suspicions: dict[str, tuple[float, dict[str, P.WorkerFailed]]] = {}  # EW -> (first report, reports by AW)
        self.silent_gap: dict[str, float] = {}  # suspect EW -> its longest gap between two messages here since the report

    # ---- workers ------------------------------------------------------------------------

    def make_launcher(self) -> tuple[Launcher, str]:
        """The launcher, and where the orchestrator binds so that its workers can reach it."""
        s, c = self.spec, self.spec.config.cluster
        if c.launcher == "local":
            local = LocalLauncher(s.run_dir, s.gpus)
            return local, local.endpoint("orchestrator")
        if c.launcher == "manual":
            return ManualLauncher(self.send), c.join_address
        import ray

        from .ray_launcher import RayLauncher

        ray.init(address=c.ray_address, namespace=Path(s.run_dir).name, logging_level="WARNING")
        return RayLauncher(s.host, Path(s.run_dir).name, self.key), f"tcp://{s.host}:*"

    def common(self, name: str) -> dict:
        s = self.spec
        return dict(name=name, config=s.config, orch_endpoint=self.endpoint, parent_pid=os.getpid(),
                    driver_pid=s.parent_pid if s.config.cluster.launcher == "local" else 0)

    def launch(self, spec: WorkerSpec, slot: str, replacement: bool) -> None:
        proc = self.launcher.start_worker(spec, self.spec.config.cluster.nodes.get(slot, ""))  # a replacement goes where its slot was
        self.workers[spec.name] = Worker(spec.name, spec.role, proc, spec, slot, replacement=replacement)

    def start_expert(self, name: str, slot: str, replacement: bool = False) -> None:
        spec = WorkerSpec(role=Role.EXPERT, experts=self.plan.experts_of(slot), shadow_experts=self.plan.shadows_of(slot),
                          nice=10 if replacement else 0, **self.common(name))
        self.launch(spec, slot, replacement)

    def store_slots(self) -> list[str]:
        """The checkpoint stores' places: "store", "store1", ... (each AW writes to all of them).
        The first store of a slot is named after it; a later one takes over its address locally."""
        suffix = f"-r{self.epoch}" if self.epoch else ""
        return [f"store{i or ''}{suffix}" for i in range(self.spec.config.resilience.stores)]

    def start_store(self, name: str, slot: str, replacement: bool = False) -> None:
        # A local replacement takes over its slot's address; elsewhere it binds where it runs (the
        # lost store's host may be gone) and attention workers are told (store_endpoints).
        endpoint = self.launcher.endpoint(slot) if name != slot and isinstance(self.launcher, LocalLauncher) else ""
        spec = WorkerSpec(role=Role.STORE, endpoint=endpoint or "", nice=10 if replacement else 0, **self.common(name))
        self.launch(spec, slot, replacement)

    def start_attention(self, name: str, slot: str, replacement: bool = False) -> None:
        """It connects to the store and to every live expert worker: it starts once their
        addresses are known (at once locally; once placed by Ray or joined by hand otherwise)."""
        live = self.live_experts()
        stores = self.store_endpoints() if self.spec.config.resilience.checkpoint else []
        experts = {w: self.launcher.endpoint(w) for w in live}
        if None in stores or None in experts.values():
            self.waiting[name] = (slot, replacement)
            return
        self.waiting.pop(name, None)
        spec = WorkerSpec(role=Role.ATTENTION, driver_endpoint=self.spec.driver_endpoint, table=self.table(), store_endpoints=stores,
                          nice=10 if replacement else 0, expert_endpoints=experts,
                          probe_endpoints_of_experts={w: self.launcher.probe_endpoint(w) for w in live},
                          **self.common(name))
        self.launch(spec, slot, replacement)

    def start(self, role: Role, name: str, slot: str, replacement: bool = False) -> None:
        {Role.EXPERT: self.start_expert, Role.ATTENTION: self.start_attention, Role.STORE: self.start_store}[role](name, slot, replacement)

    def new_name(self, role: Role) -> str:
        """A name never used in this cluster: ew3, aw2, store4, ..."""
        self.next_index[role] += 1
        return f"{NAME_PREFIX[role]}{self.next_index[role] - 1}"

    def store_endpoints(self) -> list[str | None]:
        """Where each store slot's live store listens (None: not known yet)."""
        if isinstance(self.launcher, LocalLauncher):
            return [self.launcher.endpoint(s) for s in self.store_slots()]
        live = {w.slot: w.name for w in self.workers.values() if w.role == Role.STORE and w.state == WorkerState.READY}
        return [self.launcher.endpoint(live.get(s, s)) for s in self.store_slots()]

    def live_experts(self) -> list[str]:
        return [w for w in self.current.values() if w]

    def table(self) -> RoutingTable:
        return self.plan.with_workers(self.version, self.current)

    def push_table(self) -> None:
        self.version += 1
        live = [w for w in self.live_experts() if self.launcher.endpoint(w)]  # not yet placed: not reachable either
        stores = self.store_endpoints() if self.spec.config.resilience.checkpoint else []
        update = P.TableUpdate(self.table(), {w: self.launcher.endpoint(w) for w in live},
                               {w: self.launcher.probe_endpoint(w) for w in live}, [] if None in stores else stores)
        for w in self.workers.values():
            if w.role == Role.ATTENTION and w.state in IN_SERVICE:
                self.send(w.name, update)
        self.event(EventKind.ROUTING_UPDATED, "", f"v{self.version}: experts on {', '.join(live)}")

    # ---- events and state -----------------------------------------------------------------

    def event(self, kind: EventKind, worker: str, detail: str = "", ms: float = 0.0, report: P.Report | None = None) -> None:
        counts = (report.restored_tokens, report.request_tokens) if report else (0, 0)
        self.events.append(P.Event(time.monotonic(), kind, worker, detail, ms, *counts))
        log.info("%s %s %s %s", kind, worker, detail, f"({ms:.1f} ms)" if ms else "")

    def send(self, name: str, msg: P.Msg) -> None:
        try:
            self.sock.send_multipart([name.encode(), *P.encode(msg)])
        except zmq.ZMQError:
            pass

    def publish(self) -> None:
        records = [P.WorkerRecord(w.name, w.role, w.proc.pid, w.state, w.info, w.slot if w.replacement else "",
                                  self.launcher.probe_endpoint(w.name) or "", self.launcher.endpoint(w.name) or "")
                   for w in self.workers.values()]
        planned = [w for w in self.workers.values() if not w.replacement]  # none: a restart has stopped them all
        initial_ready = bool(planned) and not self.waiting and all(w.state == WorkerState.READY for w in planned)
        if initial_ready and not self.ready_announced and self.epoch:
            self.event(EventKind.RESTART_READY, "", f"epoch {self.epoch}: every worker up again", (time.monotonic() - self.restart_t0) * 1000)
        self.ready_announced |= initial_ready
        self.published = time.monotonic()
        state = P.ClusterState(records, self.version, self.ready_announced, self.epoch, len(self.table().unavailable()),
                               dict(self.next_index), list(self.fenced))
        try:
            self.driver.send_multipart(P.encode(state), zmq.NOBLOCK)
        except zmq.Again:  # the driver is not reading: it will have the next one
            pass

    # ---- failures ---------------------------------------------------------------------------

    def fail(self, name: str, reason: str, reporter: str = "", detect_ms: float = 0.0) -> None:
        w = self.workers.get(name)
        if w is None or w.state in OUT_OF_SERVICE:
            return
        if w.stop_sent and reporter:  # told to exit after a drain: its peers see it leave
            return
        t0 = time.monotonic()
        draining, w.state, w.failed_at = w.state == WorkerState.DRAINING, WorkerState.FAILED, t0
        if w.proc.poll() is None:  # fence it: a hung worker must never come back
            w.proc.kill()
        self.event(EventKind.WORKER_FAILED, name, f"{w.role}: {reason}" + (f" (reported by {reporter})" if reporter else ""), detect_ms)
        if w.role == Role.ATTENTION:
            self.fenced.append(name)
            self.send_fence()
        if self.spec.config.resilience.recovery == RecoveryPolicy.RESTART:
            return self.restart_all(t0)
        if w.role == Role.EXPERT and self.current.get(w.slot) == w.name:  # only its holder clears a slot
            self.current[w.slot] = None
            self.push_table()
        if not draining:  # a draining worker's replacement is already on its way
            self.start_replacement(w, t0)
        self.publish()

    def start_replacement(self, w: Worker, t0: float) -> None:
        if not self.spec.config.resilience.replace_failed:
            return
        new = self.new_name(w.role)
        self.start(w.role, new, w.slot, replacement=True)
        self.event(EventKind.REPLACEMENT_STARTED, new, f"for {w.name}", (time.monotonic() - t0) * 1000)

    # ---- planned drains -----------------------------------------------------------------------

    def drain(self, name: str, why: str) -> None:
        """Take a worker out of service without a stall (rolling restarts, preemption notices):
        its replacement starts at once; an expert worker leaves every routing table first (its
        shadows serve at once, or, without shadows, its replacement once ready); an attention
        worker hands its requests back to the driver, which moves them through the store."""
        w = self.workers.get(name)
        if w is None or w.state != WorkerState.READY or w.role == Role.STORE:
            why_not = "not a ready worker" if w is None or w.state != WorkerState.READY else "the store cannot be drained (kill it: it is replaced)"
            return self.event(EventKind.DRAIN_REFUSED, name, why_not)
        t0 = time.monotonic()
        w.state, w.drain_t0 = WorkerState.DRAINING, t0
        self.event(EventKind.DRAIN_STARTED, name, why)
        self.start_replacement(w, t0)
        if w.role == Role.ATTENTION:
            self.send(name, P.Drain(name))  # stop_at is set once the driver has moved its requests
        elif self.current.get(w.slot) == name:
            self.current[w.slot] = None
            if self.table().unavailable():  # no shadows to cover it: it serves until its replacement is ready
                self.current[w.slot] = name
            else:
                self.push_table()
                w.stop_at = t0 + DRAIN_GRACE_S
        self.publish()

    def check_drain(self, w: Worker, now: float) -> None:
        """A draining worker: shut it down when due, kill it if it lingers, record how it left."""
        rc = w.proc.poll()
        if rc is not None:
            if rc != 0 and not w.stop_sent:
                return self.fail(w.name, f"exited ({rc}) while draining")
            w.state, w.failed_at = WorkerState.STOPPED, now
            self.event(EventKind.WORKER_DRAINED, w.name, f"{w.role}: exited ({rc})", (now - w.drain_t0) * 1000)
            return self.publish()
        if w.stop_at and now >= w.stop_at and not w.stop_sent:
            w.stop_sent = True
            self.send(w.name, P.Shutdown())
        elif (w.stop_sent and now > w.stop_at + DRAIN_EXIT_S) or now - w.drain_t0 > DRAIN_MAX_S:
            self.event(EventKind.DRAIN_FORCED, w.name, "did not exit in time: killed")
            w.stop_sent = True
            w.proc.kill()

    def restart_all(self, t0: float) -> None:
        """The `restart` baseline: what engines built on collectives do when any worker dies.
        Every process is new (and newly named, so nothing from before is mistaken for it)."""
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
        self.workers.clear()
        self.waiting.clear()
        self.version += 1
        self.epoch += 1
        self.restart_t0 = t0
        self.ready_announced = False
        self.publish()  # tell the driver first: its in-flight requests must be rerun
        self.start_all()
        self.event(EventKind.RESTART_STARTED, "", f"epoch {self.epoch}: every worker restarted", (time.monotonic() - t0) * 1000)

    def start_all(self) -> None:
        suffix = f"-r{self.epoch}" if self.epoch else ""
        for slot in self.store_slots():
            self.start_store(slot, slot)
        for slot in self.current:
            self.current[slot] = slot + suffix
            self.start_expert(slot + suffix, slot)
        for i in range(self.spec.config.cluster.attention_workers):
            self.start_attention(f"aw{i}{suffix}", f"aw{i}{suffix}")
        self.publish()

    def send_fence(self, only: str = "") -> None:
        """Tell the expert workers and stores (or `only` that one, just up) which attention
        workers are fenced: a partitioned one may still reach them, and must compute nothing more
        and touch no checkpoint."""
        if not self.fenced:
            return
        for w in self.workers.values():
            if w.role in (Role.EXPERT, Role.STORE) and w.state in (WorkerState.STARTING, WorkerState.READY) and only in ("", w.name):
                self.send(w.name, P.Fence(list(self.fenced)))

    def on_ready(self, w: Worker, msg: P.Ready) -> None:
        if w.state in (*OUT_OF_SERVICE, WorkerState.DRAINING):  # sent before it was fenced (or drained): it must not come back
            return
        first = w.state != WorkerState.READY
        w.state, w.info = WorkerState.READY, dict(msg.info)
        if not first:  # a periodic update (the store's byte accounting)
            return self.publish()
        if w.role in (Role.EXPERT, Role.STORE):
            self.send_fence(only=w.name)
        if w.replacement and w.role == Role.STORE and not isinstance(self.launcher, LocalLauncher):
            self.push_table()  # attention workers re-point that slot's link to it
        if w.replacement:
            self.event(EventKind.REPLACEMENT_READY, w.name, f"in place of {w.slot}", (time.monotonic() - w.started) * 1000)
        if w.replacement and w.role == Role.EXPERT:
            self.current[w.slot] = w.name
            self.push_table()
            for old in self.workers.values():  # a drained worker that served until now may go
                if old.state == WorkerState.DRAINING and old.slot == w.slot and not old.stop_at:
                    old.stop_at = time.monotonic() + DRAIN_GRACE_S
        elif w.role == Role.ATTENTION and w.spec is not None and w.spec.table.version < self.version:
            self.push_table()  # it started with an older table
        self.publish()

    def tell_to_stop(self, name: str) -> None:
        """A fenced or unknown worker that speaks (its host's link came back, it was only frozen,
        a predecessor started it) is told to shut down, at most once a second each: a Shutdown
        sent when it was fenced may have been lost with its connection. Told on both its
        channels: its heartbeats may come back before its main channel does (which also waits
        while an earlier connection under its name lingers here), and the liveness thread ends
        the process whatever its main thread waits for."""
        now = time.monotonic()
        if now - self.told_to_stop.get(name, 0.0) >= 1.0:
            if len(self.told_to_stop) >= 1024:
                self.told_to_stop.clear()
            self.told_to_stop[name] = now
            log.info("%s is out of service but speaks: told to shut down", name)
            self.send(name, P.Shutdown())
            self.send(f"{name}#hb", P.Shutdown())

    def suspect(self, ew: Worker, msg: P.WorkerFailed) -> None:
        """An attention worker lost an expert worker: weighed against the heartbeats that worker
        still sends here (see `judge_suspicions`) before anyone is fenced."""
        if ew.state != WorkerState.READY:
            return self.fail(ew.name, msg.reason, reporter=msg.reporter, detect_ms=msg.detect_ms)
        now = time.monotonic()
        _, reports = self.suspicions.setdefault(ew.name, (now, {}))
        reports[msg.reporter] = msg
        self.silent_gap[ew.name] = max(self.silent_gap.get(ew.name, 0.0), now - ew.last_beat)

    def judge_suspicions(self, now: float) -> None:
        """An expert worker reported lost that still beats here, `heartbeat_s * 3` after the
        report, is alive: its reporters are the ones cut off (a partition between them), and are
        fenced, so their requests move to attention workers that reach every expert; unless every
        live attention worker reported it, when it serves nobody and is fenced itself. One that
        stays silent `heartbeat_s * 6` after the report is failed, as reported; so is one whose
        beats stopped here too around the report (`heartbeat_s * 2` or more between two): it was
        stopped or starved for a while (a pause, not a partition), its reporters were right. A
        report from a worker fenced since (cut off from another expert worker it also reported)
        is no evidence: without it a beat late by 100 ms on a busy host failed a healthy one."""
        hb = self.spec.config.resilience.heartbeat_s
        for name, (t, reports) in list(self.suspicions.items()):
            ew = self.workers.get(name)
            for reporter in [r for r in reports if r in self.workers and self.workers[r].state in OUT_OF_SERVICE]:
                del reports[reporter]  # fenced since (cut off from another expert worker, say): no evidence
            if not reports:
                del self.suspicions[name]
                self.silent_gap.pop(name, None)
                continue
            first = next(iter(reports.values()))
            if ew is None or ew.state != WorkerState.READY:
                del self.suspicions[name]
                self.silent_gap.pop(name, None)
            elif ew.last_beat > t + 3 * hb:
                del self.suspicions[name]
                if self.silent_gap.pop(name, 0.0) >= 2 * hb:
                    self.fail(name, f"{first.reason}; its heartbeats stopped too", first.reporter, first.detect_ms)
                    continue
                live = {w.name for w in self.workers.values() if w.role == Role.ATTENTION and w.state == WorkerState.READY}
                if live <= reports.keys():
                    self.fail(name, f"{first.reason}; unreachable from every attention worker", first.reporter, first.detect_ms)
                    continue
                for reporter in reports.keys() & live:
                    self.fail(reporter, f"cut off from {name}, which is alive")
            elif now - t > 6 * hb:
                del self.suspicions[name]
                self.silent_gap.pop(name, None)
                self.fail(name, first.reason, reporter=first.reporter, detect_ms=first.detect_ms)

    def check_liveness(self) -> None:
        now = time.monotonic()
        self.judge_suspicions(now)
        for w in list(self.workers.values()):
            if self.workers.get(w.name) is not w:  # replaced by a restart during this loop
                continue
            if w.state in OUT_OF_SERVICE:
                if w.proc.poll() is not None and now - w.failed_at > FAILED_RETENTION_S:
                    del self.workers[w.name]  # reaped and reported long enough: out of the registry
                continue
            if w.state == WorkerState.DRAINING:
                self.check_drain(w, now)
            elif w.proc.poll() is not None:
                self.fail(w.name, f"process exited ({w.proc.returncode})")
            elif w.state == WorkerState.READY and now - w.last_beat > self.heartbeat_timeout.value and not self.starved(w, now):
                self.fail(w.name, f"no heartbeat for {(now - w.last_beat) * 1000:.0f} ms")
        for name, why in self.gray.slow(now):
            self.gray.forget(name)
            if name in self.workers and self.workers[name].state == WorkerState.READY:
                self.fail(name, why)

    # ---- main loop --------------------------------------------------------------------------

    def adopt(self) -> None:
        """A successor: take over the workers its predecessor last published. They kept serving
        and re-register (their liveness threads resend Ready once reconnected); one that died
        meanwhile is found by its pid and replaced as usual."""
        s = self.spec
        # Newer than any table the predecessor may have pushed but not yet published.
        self.version, self.epoch, self.ready_announced = s.table_version + 8, s.epoch, True
        self.next_index.update(s.next_index)
        self.fenced.extend(s.fenced)  # told to each expert worker and store as it re-registers
        for r in s.adopt:
            if r.state in OUT_OF_SERVICE:
                continue
            if isinstance(self.launcher, ManualLauncher):  # on another host: no pid to watch, heartbeats tell
                if not r.probe_endpoint:
                    continue  # a slot no joiner had filled yet: filled afresh below
                proc = self.launcher.adopt(WorkerSpec(role=r.role, endpoint=r.endpoint, probe_endpoint=r.probe_endpoint, **self.common(r.name)))
            else:
                proc = AdoptedProcess(r.pid)
            self.workers[r.name] = Worker(r.name, r.role, proc, None, r.replaces or r.name,
                                          replacement=bool(r.replaces), state=r.state, info=dict(r.info))
            if r.state == WorkerState.DRAINING:  # its drain was under way: finish it (its replacement was started)
                w = self.workers[r.name]
                w.drain_t0 = w.stop_at = time.monotonic()
            m = re.search(r"(\d+)$", r.name)
            if m and r.role in self.next_index:
                self.next_index[r.role] = max(self.next_index[r.role], int(m.group(1)) + 1)
        for slot in self.current:
            self.current[slot] = next((w.name for w in self.workers.values()
                                       if w.role == Role.EXPERT and w.slot == slot and w.state == WorkerState.READY), None)
        self.event(EventKind.ORCHESTRATOR_REPLACED, "", f"{s.replaced}; adopted {', '.join(self.workers) or 'no worker'}")
        self.push_table()
        self.fill_empty_slots()
        self.publish()

    def fill_empty_slots(self) -> None:
        """Replace workers that failed with no replacement known: the predecessor may have died
        before it started one, or before it published one it had started (then unknown, and shut
        down when it says Ready)."""
        if not self.spec.config.resilience.replace_failed:
            return
        suffix = f"-r{self.epoch}" if self.epoch else ""
        slots = [(Role.STORE, slot) for slot in self.store_slots()] + [(Role.EXPERT, slot) for slot in self.current]
        slots += [(Role.ATTENTION, f"aw{i}{suffix}") for i in range(self.spec.config.cluster.attention_workers)]
        for role, slot in slots:
            if not any(w.slot == slot and w.state in IN_SERVICE for w in self.workers.values()):
                name = self.new_name(role)
                self.start(role, name, slot, replacement=True)
                self.event(EventKind.REPLACEMENT_STARTED, name, f"for slot {slot}, empty after the predecessor's death")

    def run(self) -> None:
        self.adopt() if self.spec.adopt else self.start_all()
        freeze_heap()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.driver, zmq.POLLIN)
        exits = ExitWatch(poller, enabled=self.spec.config.cluster.launcher == "local")
        next_check = 0.0
        while True:
            exits.watch(self.workers.values())
            urgent = exits.fired(poller.poll(timeout=LOOP_S * 1000))
            # Drain everything queued before judging liveness: a heartbeat waiting in the queue
            # behind other messages (a busy moment) is a heartbeat received.
            while self.driver.poll(0):
                got = recv(self.driver, FROM_DRIVER, "orchestrator (driver)")
                if got is not None and not self.on_driver(got.msg):
                    return self.shutdown()
                urgent = True
            while self.sock.poll(0):
                got = recv(self.sock, FROM_WORKERS, "orchestrator")
                if got is not None:
                    self.on_worker(got)
                    urgent |= not isinstance(got.msg, P.Heartbeat)
            # A heartbeat alone (120 a second) needs no judgement: liveness is checked every
            # CHECK_S, and at once on anything else (an exit, a report, the driver).
            if urgent or time.monotonic() >= next_check:
                for name, (slot, replacement) in list(self.waiting.items()):
                    self.start_attention(name, slot, replacement)
                self._discount_own_lag()
                self.check_liveness()
                next_check = time.monotonic() + CHECK_S
            if time.monotonic() - self.published >= self.spec.publish_s:
                self.publish()

    def starved(self, w: Worker, now: float) -> bool:
        """A local worker silent because it waits for a CPU (runnable), not hung: given up to the cap."""
        return self.spec.config.cluster.launcher == "local" and now - w.last_beat < HEARTBEAT_CAP_S and runnable(w.proc.pid)

    def _discount_own_lag(self) -> None:
        """A loop that came round late (this process was not running: a busy machine) did not
        see the heartbeats sent meanwhile: that time is not counted against the workers."""
        now = time.monotonic()
        lag = now - self.last_loop - 0.1
        self.last_loop = now
        if lag > 0:
            for w in self.workers.values():
                w.last_beat += lag

    def on_worker(self, got: Received) -> None:
        """Act only on what a worker in good standing says of itself: never on an unknown or
        failed worker (fenced: it must never come back), nor on a name other than its own."""
        msg, sender = got.msg, got.sender
        if isinstance(msg, P.Join):
            if isinstance(self.launcher, ManualLauncher):
                self.launcher.join(sender, msg)
            return
        w = self.workers.get(sender.removesuffix("#hb"))
        if w is None:
            if isinstance(msg, (P.Ready, P.Heartbeat)):  # not ours: fenced and forgotten, or started by a predecessor
                self.tell_to_stop(sender.removesuffix("#hb"))
            return drops.note("orchestrator", sender, f"{type(msg).__name__} from a worker that is not ours")
        if w.state in OUT_OF_SERVICE:  # fenced: heard again once a cut link heals; told to go
            self.tell_to_stop(w.name)
            return drops.note("orchestrator", sender, f"{type(msg).__name__} from a worker that is not in service")
        # The heartbeat channel carries beats, and the worker's Ready again when it reconnects (to a successor).
        on_hb = sender.endswith("#hb")
        if (on_hb and not isinstance(msg, (P.Heartbeat, P.Ready, P.Drain))) or (not on_hb and isinstance(msg, P.Heartbeat)) \
                or getattr(msg, "name", w.name) != w.name:
            return drops.note("orchestrator", sender, f"{type(msg).__name__} on the wrong channel or under another name")
        now = time.monotonic()
        if w.name in self.suspicions:  # the longest silence of a suspect, as seen here
            self.silent_gap[w.name] = max(self.silent_gap.get(w.name, 0.0), now - w.last_beat)
        if isinstance(msg, P.Heartbeat) and w.state == WorkerState.READY:
            self.heartbeat_timeout.observe(now - w.last_beat, now)
            self.gray.observe(w.name, max(0.0, now - w.last_beat - self.spec.config.resilience.heartbeat_s), now)
        w.last_beat = now  # any message is a sign of life (Ready may beat the first heartbeat)
        if isinstance(msg, P.Ready) and msg.role == w.role:
            self.on_ready(w, msg)
        elif isinstance(msg, P.WorkerFailed) and w.role == Role.ATTENTION and msg.reporter == w.name:
            target = self.workers.get(msg.worker)
            if target is not None and target.role == Role.EXPERT and msg.slow:  # its replies came, slowly: no partition
                self.fail(target.name, msg.reason, reporter=msg.reporter, detect_ms=msg.detect_ms)
            elif target is not None and target.role == Role.EXPERT:  # an AW's evidence is about expert workers
                self.suspect(target, msg)
        elif isinstance(msg, P.Report) and msg.worker == w.name:
            self.event(msg.kind, msg.worker, msg.detail, msg.ms, report=msg)
        elif isinstance(msg, P.Drain) and w.state == WorkerState.READY:  # it got SIGTERM: a preemption notice
            self.drain(w.name, "SIGTERM")

    def on_driver(self, msg: P.Msg) -> bool:
        if isinstance(msg, P.GetEvents):
            self.driver.send_multipart(P.encode(P.EventLog(list(self.events))))
        elif isinstance(msg, P.Report):
            self.event(msg.kind, msg.worker, msg.detail, msg.ms, report=msg)
        elif isinstance(msg, P.Handover):  # the driver moved requests: the store must let their new owner in
            for w in self.workers.values():
                if w.role == Role.STORE and w.state in IN_SERVICE:
                    self.send(w.name, msg)
        elif isinstance(msg, P.Drain):
            self.drain(msg.name, "asked by the driver")
        elif isinstance(msg, P.Drained):  # the driver has moved the attention worker's requests
            w = self.workers.get(msg.name)
            if w is not None and w.state == WorkerState.DRAINING:
                w.stop_at = time.monotonic()
        elif isinstance(msg, P.WorkerFailed):  # the driver's evidence is about attention workers (see llm.AttentionProbes)
            target = self.workers.get(msg.worker)
            if target is not None and target.role == Role.ATTENTION:
                self.fail(msg.worker, msg.reason, reporter="driver", detect_ms=msg.detect_ms)
        elif isinstance(msg, P.Shutdown):
            return False
        return True

    def shutdown(self) -> None:
        for w in self.workers.values():
            if w.state not in OUT_OF_SERVICE:
                self.send(w.name, P.Shutdown())
        deadline = time.monotonic() + 3.0
        for w in self.workers.values():
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.state = WorkerState.STOPPED


class ExitWatch:
    """Wakes the orchestrator's loop the moment a local worker's process exits: each one's pidfd
    (Linux) is polled beside the sockets, so the loop needs no short timeout to notice a death,
    and idles at LOOP_S (it came round 100 times a second: 5 % of a core on an idle cluster).
    Workers with no local pid (Ray, hand-joined) are found by heartbeats, as before."""

    def __init__(self, poller: zmq.Poller, enabled: bool):
        self.poller, self.enabled = poller, enabled and hasattr(os, "pidfd_open")  # local pids only
        self.fds: dict[str, int] = {}  # worker -> pidfd, until it fires or the worker leaves
        self.done: set[str] = set()  # fired, or not watchable

    def watch(self, workers) -> None:
        names = set()
        for w in workers:
            names.add(w.name)
            pid = getattr(w.proc, "pid", None)
            if not self.enabled or w.name in self.fds or w.name in self.done or not isinstance(pid, int) or pid <= 0:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already (check_liveness sees it), or not ours to watch
                self.done.add(w.name)
                continue
            self.fds[w.name] = fd
            self.poller.register(fd, zmq.POLLIN)
        for name in [n for n in self.fds if n not in names]:
            self._close(name)
        self.done &= names

    def fired(self, events: list) -> bool:
        """Stop watching the workers whose process exited (a pidfd stays readable); True if any."""
        ready = {fd for fd, _ in events if isinstance(fd, int)}
        gone = [n for n, fd in self.fds.items() if fd in ready]
        for name in gone:
            self._close(name)
        return bool(gone)

    def _close(self, name: str) -> None:
        fd = self.fds.pop(name)
        self.poller.unregister(fd)
        os.close(fd)
        self.done.add(name)


def main(argv: list[str]) -> None:
    spec = msgspec.json.decode(argv[0], type=ClusterSpec)
    die_with_parent(spec.parent_pid)
    never_preempt()  # every thread it starts inherits it: the orchestrator is off the datapath
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    orch = Orchestrator(spec)
    try:
        orch.run()
    finally:
        # Workers that joined by hand learn of the shutdown only by message: let it leave first.
        orch.ctx.destroy(linger=1000 if spec.config.cluster.launcher == "manual" else 0)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The driver's client of the cluster: its sockets, its I/O thread, and what that thread does
with what the cluster says (tokens to requests, failures to recovery).

ZMQ sockets are not thread-safe, so one I/O thread owns them all. Other threads hand it typed
commands (`Send`, `Abort`, `Stop`) through a queue and wake it with an eventfd that its poller
watches beside the cluster's socket. The thread survives any error of a handler (logged),
supervises the orchestrator (a dead or silent one is replaced by a successor that adopts the
running workers), and ends requests with an error when the cluster has produced no token for
`stall_timeout_s`: no request ever waits forever.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch
import zmq

from . import protocol as P
from . import recovery
from .config import ModelConfig, TarragonConfig
from .engine_args import visible_gpus
from .launcher import LocalLauncher, control_host, pid_alive
from .orchestrator import ClusterSpec
from .outputs import Request
from .probes import AttentionProbes
from .procfs import make_run_dir
from .shadow_placement import place as place_experts
from .sockets import ClusterKey, Context, Received, drops, make_socket, recv
from .spawner import spawn
from .stats import DriverStats
from .vocabulary import EventKind, FinishReason, Role, WorkerState
from .worker import never_preempt, zmq_threads

log = logging.getLogger("tarragon.llm")

# What the driver accepts on its socket (who may send each is checked in `_in_standing`).
FROM_CLUSTER = (P.ClusterState, P.EventLog, P.Ready, P.Tokens, P.PromptLogits, P.Drained)


@dataclass(frozen=True)
class Send:
    """A message for a worker (or the orchestrator), encoded by the calling thread."""

    worker: str
    frames: list


@dataclass(frozen=True)
class Abort:
    """A request the caller ended: stop measuring it, and have its worker (or, for an orphan,
    any live attention worker, for the store's sake) drop it."""

    req_id: str
    worker: str


@dataclass(frozen=True)
class Stop:
    """Shutdown is done with the workers: close the sockets and end the thread."""


Command = Send | Abort | Stop


class ClusterClient:
    """Started by `LLM`: `start()` launches the orchestrator (which launches every worker) and
    returns once every attention worker has said hello."""

    def __init__(self, config: TarragonConfig, model: ModelConfig):
        self.config, self.model = config, model
        c, r = config.cluster, config.resilience
        gpus = visible_gpus() if config.model.device == "cuda" and c.launcher == "local" else []  # Ray gives each actor its GPU
        # Workers on other hosts reach the driver over TCP (ray, manual); local ones over IPC.
        host, c.ray_address, self._ray_started = control_host(c.launcher, c.ray_address or None, c.join_address or None,
                                                              (c.attention_workers + c.expert_workers + 1) * c.threads_per_worker)
        self.run_dir = make_run_dir()
        self.launcher = LocalLauncher(self.run_dir)
        key, c.key_file = _cluster_key(self.run_dir, c.key_file or None, c.insecure_transport)
        self.ctx = Context(key)
        self.router = make_socket(self.ctx, zmq.ROUTER, bind=f"tcp://{host}:*" if host else self.launcher.endpoint("driver"),
                                  max_bytes=P.MAX_MESSAGE_BYTES)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.local = not host
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopped = False  # no more commands: the I/O thread is told to stop
        self._commands_lock = threading.Lock()  # the eventfd is closed only once no thread can write it
        self.probes = AttentionProbes(self.ctx)  # used by the I/O thread only
        self.lock = threading.Lock()  # guards `requests` and `_orphans`
        self.requests: dict[str, Request] = {}  # unfinished requests
        self.stats = DriverStats()
        self.state: P.ClusterState | None = None  # the orchestrator's last word
        self.hello: set[str] = set()  # attention workers connected to this driver
        self.draining: set[str] = set()  # attention workers that handed their requests back
        self.slot_of: dict[str, str] = {}  # every worker seen -> the planned place it held (outlives its record)
        self.epoch = 0  # whole-cluster restarts (recovery="restart")
        self._orphans: list[Request] = []  # requests waiting for a live attention worker
        self._pending_aborts: list[str] = []  # aborted orphans: their checkpoints are still to drop
        self._replies: queue.Queue = queue.Queue()
        self._events_lock = threading.Lock()  # one GetEvents in flight: replies carry no request id
        self.progress = time.monotonic()  # the last token, or when requests began waiting on an idle cluster
        self.orch_seen = 0.0  # the last message from the orchestrator
        self.orch_heard = False  # from the current one (not yet, after a replacement)
        self.serving = False  # start-up is over: the orchestrator is supervised from now on
        self.closed = False
        self._orch_started = self._next_check = 0.0
        expert_bytes = 3 * model.hidden_size * model.expert_intermediate_size * torch.empty((), dtype=_dtype(config)).itemsize
        self.plan = place_experts(model.num_experts, list(model.sparse_layers), [f"ew{j}" for j in range(c.expert_workers)],
                                  r.shadows, expert_bytes, r.shadow_budget_bytes, c.nodes, c.expert_primaries,
                                  pack=c.placement == "pack")  # version 0 of the routing table
        self.spec = ClusterSpec(config=config, plan=self.plan, run_dir=str(self.run_dir),
                                driver_endpoint=self.router.getsockopt_string(zmq.LAST_ENDPOINT), parent_pid=os.getpid(),
                                host=host, gpus=gpus)
        self.io = threading.Thread(target=self._io_loop, name="tarragon-io", daemon=True)

    # ---- lifecycle (caller's thread) ----------------------------------------------------------

    def start(self) -> None:
        self.io.start()
        self.orch = spawn(self.launcher.start, "tarragon.orchestrator", "orchestrator", self.spec)
        self._orch_started = time.monotonic()
        self._wait_ready(self.config.cluster.startup_timeout)
        self.serving = True

    def _wait_ready(self, timeout: float) -> None:
        from tqdm import tqdm

        c = self.config.cluster
        total, deadline, last = c.attention_workers + c.expert_workers, time.monotonic() + timeout, 0
        with tqdm(total=total, desc="starting workers", unit="worker", leave=False, disable=None) as bar:
            while True:
                workers = self.state.workers if self.state else []
                ready = sum(w.state == WorkerState.READY for w in workers)
                if ready != last:  # progress lines too: there may be no terminal for the bar
                    log.info("workers ready: %d of %d", ready, len(workers) if self.state else total)
                    bar.update(ready - last)
                    last = ready
                if self.state and self.state.ready and all(w.name in self.hello for w in workers if w.role == Role.ATTENTION):
                    return
                if self.orch.poll() is not None:
                    raise RuntimeError(f"the orchestrator exited during start-up:\n{self.launcher.log_tail('orchestrator')}")
                for w in workers:
                    if w.state == WorkerState.FAILED:
                        raise RuntimeError(f"worker {w.name} failed during start-up:\n{self.launcher.log_tail(w.name)}\n"
                                           f"{self.launcher.log_tail('orchestrator')}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers not ready after {timeout:.0f}s")
                time.sleep(0.02)

    def shutdown(self) -> None:
        """Stop every worker process (politely, then by force) and release resources."""
        self.closed = True
        with self.lock:
            pending = list(self.requests.values())
        for req in pending:
            self.end_with_error(req, "the LLM was shut down")
        orch = getattr(self, "orch", None)
        if orch is not None:
            try:
                self.send("orchestrator", P.Shutdown())
                orch.wait(8.0)
            except Exception:
                orch.kill()
                orch.wait()
        for w in self.state.workers if self.state and self.local else []:  # belt and braces (pids of this host)
            if pid_alive(w.pid):
                os.kill(w.pid, signal.SIGKILL)
        self._stop_io()
        log_dir = self.config.cluster.log_dir
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            for f in self.run_dir.glob("*.log"):
                shutil.copy2(f, os.path.join(log_dir, f.name))
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._ray_started:
            import ray

            ray.shutdown()

    def _stop_io(self) -> None:
        self._command(Stop())
        with self._commands_lock:
            self._stopped = True
        if self.io.is_alive():
            self.io.join(timeout=5.0)
        if self.io.is_alive():  # last resort: closes the I/O thread's sockets under it
            self.ctx.destroy(linger=0)
            return
        if not self.router.closed:  # the thread never ran
            self.probes.close()
            self.router.close(0)
        os.close(self._wake)
        self.ctx.term()

    # ---- commands (any thread) ----------------------------------------------------------------

    def _command(self, cmd: Command) -> None:
        with self._commands_lock:
            if self._stopped:
                return
            self._commands.put(cmd)
            os.eventfd_write(self._wake, 1)

    def send(self, worker: str, header: P.Msg, *tensors: torch.Tensor) -> None:
        """Send to a worker (or "orchestrator") from any thread, through the I/O thread."""
        self._command(Send(worker, P.encode(header, *tensors)))

    def submit(self, req: Request) -> None:
        """Place a new request on an attention worker (or hold it until one is up) and send it."""
        with self.lock:
            if not self.requests:
                self.progress = time.monotonic()  # an idle cluster has not stalled: its clock starts now
            req.worker = recovery.place(self._loads(), self.config.cluster.placement, self.config.scheduler.max_num_seqs)
            self.requests[req.req_id] = req
            if not req.worker:  # no attention worker up right now: placed as soon as one is
                self._orphans.append(req)
                return
        self.send(req.worker, P.AddRequest(req.req_id, req.prompt_ids, req.params))

    def abort(self, req: Request) -> None:
        with self.lock:
            self.requests.pop(req.req_id, None)
        req.finish_reason = req.finish_reason or FinishReason.ABORT
        req.done.set()
        self._command(Abort(req.req_id, req.worker))
        if req.listener:
            req.listener()

    def events(self, timeout: float) -> list[P.Event]:
        """The orchestrator's event log."""
        with self._events_lock:
            while not self._replies.empty():
                self._replies.get_nowait()
            self.send("orchestrator", P.GetEvents())
            try:
                return self._replies.get(timeout=timeout).events
            except queue.Empty:
                raise TimeoutError(f"the orchestrator did not answer within {timeout:.1f} s") from None

    def end_with_error(self, req: Request, why: str) -> None:
        """End a request the cluster cannot serve: its waiter wakes, its stream gets the error."""
        with self.lock:
            if self.requests.pop(req.req_id, None) is None:
                return
        req.error, req.finish_reason = why, FinishReason.ERROR
        req.done.set()
        if req.listener:
            req.listener()

    def stalled_for(self) -> float:
        """Seconds since the cluster last made progress while requests wait (0 when none wait)."""
        with self.lock:
            waiting = bool(self.requests)
        return time.monotonic() - self.progress if waiting else 0.0

    def live_attention(self) -> list[str]:
        """Attention workers that take requests now: ready, connected, not draining."""
        if not self.state or (self.epoch and not self.state.ready):
            return []
        return [w.name for w in self.state.workers if w.role == Role.ATTENTION and w.state == WorkerState.READY
                and w.name in self.hello and w.name not in self.draining]

    def _loads(self) -> dict[str, int]:
        """Requests per live attention worker (call with the lock held)."""
        loads = {name: 0 for name in self.live_attention()}
        for r in self.requests.values():
            if r.worker in loads:
                loads[r.worker] += 1
        return loads

    # ---- the I/O thread -------------------------------------------------------------------------

    def _io_loop(self) -> None:
        never_preempt()  # this thread, and ZeroMQ's: never take an attention worker's core
        never_preempt(zmq_threads())
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        while True:
            events = dict(poller.poll(100))
            try:
                if self._wake in events and not self._run_commands():
                    break
                # Drain what is queued before judging the orchestrator: its state may wait behind tokens.
                for _ in range(10_000 if self.router in events else 0):
                    try:
                        got = recv(self.router, FROM_CLUSTER, "driver", zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if got is not None:
                        self.on_message(got)
                self._supervise(time.monotonic())
            except Exception:  # a handler's bug must never take the driver down: log it, go on
                log.exception("driver I/O thread: error in a handler (survived)")
        self.probes.close()
        self.router.close(0)

    def _run_commands(self) -> bool:
        """Every queued command; False once told to stop."""
        try:
            os.eventfd_read(self._wake)  # before draining: a command queued after this wakes the poller again
        except BlockingIOError:
            pass
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if isinstance(cmd, Stop):
                return False
            if isinstance(cmd, Send):
                self._route_frames(cmd.worker, cmd.frames)
            else:
                self._on_abort(cmd)

    def _on_abort(self, cmd: Abort) -> None:
        self._token(cmd.req_id, time.monotonic(), counts=False)  # not a stream to measure any more
        if cmd.worker in self.live_attention() and self.route(cmd.worker, P.AbortRequest([cmd.req_id])):
            return
        # An orphan (its worker failed) has no worker to tell, but may have a checkpoint: any live
        # attention worker, now or once there is one, passes the abort on to the store, which drops it.
        self._pending_aborts.append(cmd.req_id)
        self._place_orphans()

    def route(self, worker: str, header: P.Msg) -> bool:
        """Send from the I/O thread; False if `worker` cannot be reached (it is gone)."""
        return self._route_frames(worker, P.encode(header))

    def _route_frames(self, worker: str, frames: list) -> bool:
        try:
            self.router.send_multipart([worker.encode(), *frames])
            return True
        except zmq.ZMQError as e:  # that worker is gone: nothing to deliver to
            log.warning("cannot send to %s: %s", worker, e)
            return False

    def on_message(self, got: Received) -> None:
        now = time.monotonic()
        msg, sender = got.msg, got.sender
        if not self._in_standing(sender, msg):
            return drops.note("driver", sender, f"{type(msg).__name__} from a sender not entitled to it")
        if sender == "orchestrator":
            self.orch_seen, self.orch_heard = now, True
        else:
            self.probes.heard_from(sender, now)
        if isinstance(msg, P.ClusterState):
            self.on_cluster_state(msg)
        elif isinstance(msg, P.EventLog):
            self._replies.put(msg)
        elif isinstance(msg, P.Ready):
            self.hello.add(sender)
            self._place_orphans()
        elif isinstance(msg, P.Tokens):
            self._on_tokens(sender, msg, now)
        elif isinstance(msg, P.Drained) and msg.name == sender:
            self._on_drained(sender)
        elif isinstance(msg, P.PromptLogits):
            self._on_prompt_logits(sender, msg, got.bufs)

    def _on_prompt_logits(self, sender: str, msg: P.PromptLogits, bufs: list) -> None:
        req = self.requests.get(msg.req_id)
        try:
            if req is None or req.worker != sender or len(bufs) != 1:
                raise P.BadMessage(f"prompt logits of {msg.req_id}, not a request of {sender}, or not one frame")
            logits = P.to_tensor(msg.logits, bufs[0])
            if logits.shape != (len(req.prompt_ids), self.model.vocab_size):
                raise P.BadMessage(f"prompt logits of shape {list(logits.shape)} for a prompt of {len(req.prompt_ids)}")
            req.prompt_logits = logits.float().clone()
        except P.BadMessage as e:
            drops.note("driver", sender, str(e))

    def _on_tokens(self, sender: str, msg: P.Tokens, now: float) -> None:
        self.stats.kv_used[sender] = msg.kv_used
        self.stats.replayed[sender] = msg.replayed
        for i, (req_id, tok, finish) in enumerate(zip(msg.req_ids, msg.tokens, msg.finish)):
            req = self.requests.get(req_id)
            if req is None or req.worker != sender:  # e.g. an answer from before a failover
                continue
            self.progress = now
            if req.skip:
                req.skip -= 1
                continue
            req.tokens.append(tok)
            req.times.append(now)
            if req.params.logprobs is not None:
                req.logprobs.append(msg.logprobs[i] if len(msg.logprobs) == len(msg.req_ids) else None)
            self._token(req_id, now)
            if finish:
                req.finish_reason = FinishReason(finish)
                with self.lock:
                    self.requests.pop(req_id, None)  # abort() may have raced this final token
                req.done.set()
            if req.listener:
                req.listener()

    def _token(self, req_id: str, now: float, counts: bool = True) -> None:
        """A stream moved on (or ended): report the stall of each failure it was the last one of."""
        for stall in self.stats.token(req_id, now, counts):
            self.route("orchestrator", P.Report(EventKind.STALL, "driver", "largest token gap across the failure, over all streams",
                                                stall * 1000))

    def _in_standing(self, sender: str, msg: P.Msg) -> bool:
        """Cluster state only from the orchestrator; the rest only from attention workers it has
        not declared failed (a Ready may come before the state that lists its sender)."""
        if isinstance(msg, (P.ClusterState, P.EventLog)):
            return sender == "orchestrator"
        record = next((w for w in self.state.workers if w.name == sender), None) if self.state else None
        if isinstance(msg, P.Ready):
            return msg.name == sender and msg.role == Role.ATTENTION and (
                record.role == Role.ATTENTION and record.state in (WorkerState.STARTING, WorkerState.READY) if record
                else len(self.hello) < 4096)
        return record is not None and record.role == Role.ATTENTION and record.state in (WorkerState.READY, WorkerState.DRAINING)

    # ---- failures and recovery (I/O thread) ---------------------------------------------------

    def on_cluster_state(self, state: P.ClusterState) -> None:
        old = {w.name: w.state for w in self.state.workers} if self.state else {}
        self.state = state
        self.probes.sync(state.workers, time.monotonic())
        self.slot_of.update((w.name, w.replaces or w.name) for w in state.workers)
        failed = WorkerState.FAILED
        newly_failed = [w for w in state.workers if w.state == failed and old.get(w.name, failed) != failed]
        if newly_failed or state.epoch != self.epoch:
            self._watch_failure()
            for w in newly_failed:
                self.stats.failed(w.role)
            if state.epoch != self.epoch:
                self.stats.failed("any (restart)")
        if state.epoch != self.epoch:  # `restart`: every worker is new; rerun everything
            self.epoch = state.epoch
            self.hello.clear()
            with self.lock:
                orphans = list(self.requests.values())
                for req in orphans:
                    req.skip = len(req.tokens)
                self._orphans = orphans
            return
        for w in state.workers:
            if w.role == Role.ATTENTION and w.state == failed and old.get(w.name) != failed:
                self.hello.discard(w.name)
                with self.lock:
                    self._orphans += [r for r in self.requests.values() if r.worker == w.name]
        self._place_orphans()

    def _on_drained(self, worker: str) -> None:
        """A draining attention worker has stopped, its KV committed: move its requests now (they
        restore from the store), then let the orchestrator shut it down."""
        self.hello.discard(worker)  # never placed on again
        self.draining.add(worker)
        with self.lock:
            moved = [r for r in self.requests.values() if r.worker == worker]
            self._orphans += moved
        if moved:
            self._watch_failure()
        self._place_orphans()
        self.route("orchestrator", P.Drained(worker))

    def _watch_failure(self) -> None:
        with self.lock:
            self.stats.watch_failure({r.req_id: r.times[-1] for r in self.requests.values() if r.times})

    def _place_orphans(self) -> None:
        """Move the requests of failed or drained attention workers to live ones, resumed as the
        recovery policy says."""
        live = self.live_attention()
        if self._pending_aborts and live:  # the store drops a checkpoint only for its owner: hand it over first
            self.route("orchestrator", P.Handover(self._pending_aborts, live[0]))
            if self.route(live[0], P.AbortRequest(self._pending_aborts)):
                self._pending_aborts = []
        if not self._orphans or not live:
            return
        if self.epoch and len(live) < sum(w.role == Role.ATTENTION for w in self.state.workers):
            return  # after a restart, rerun everything once every attention worker is back
        with self.lock:
            orphans = [r for r in {r.req_id: r for r in self._orphans}.values() if not r.done.is_set()]
            self._orphans = []
            plan = recovery.assign(orphans, self._loads(), self.config.cluster.placement, self.config.scheduler.max_num_seqs)
        self._hand_over(plan)
        self._resume(plan, live)

    def _hand_over(self, plan: list[tuple[Request, str]]) -> None:
        """Tell the store (through the orchestrator) who owns each moved request from now on, so
        it lets the new owner restore and write it; sent before the requests themselves."""
        owners: dict[str, list[str]] = {}
        for req, worker in plan:
            if not req.skip:
                owners.setdefault(worker, []).append(req.req_id)
        for owner, req_ids in owners.items():
            self.route("orchestrator", P.Handover(req_ids, owner))

    def _resume(self, plan: list[tuple[Request, str]], live: list[str]) -> None:
        policy = self.config.resilience.recovery
        store_ok = any(w.role == Role.STORE and w.state == WorkerState.READY for w in self.state.workers)
        placed, recomputed = 0, 0
        for req, worker in plan:
            msg, how = recovery.resume(policy, req, store_ok)
            if not self.route(worker, msg):  # died since its last word: placed again at the next state
                self.hello.discard(worker)
                with self.lock:
                    self._orphans.append(req)
                continue
            req.worker, placed = worker, placed + 1
            self.stats.reassigned[how] += 1
            if req.tokens and how != "restored":
                recomputed += len(req.prompt_ids) + len(req.tokens)
        if placed:
            self.stats.reassignment(placed, recomputed, policy)
            self.route("orchestrator", P.Report(EventKind.REQUESTS_REASSIGNED, "driver",
                                                f"{placed} requests to {', '.join(live)} ({policy})", 0.0))

    # ---- supervision (I/O thread) -------------------------------------------------------------

    def _supervise(self, now: float) -> None:
        """End requests the cluster cannot serve; probe silent attention workers; replace a dead
        or silent orchestrator."""
        if self.closed or now < self._next_check:
            return
        self._next_check = now + 0.05
        self._end_stalled(now)
        if not self.serving:
            return
        with self.lock:
            owing = {r.worker for r in self.requests.values()}
        for report in self.probes.check(owing & set(self.live_attention()), now):
            log.warning("attention worker %s: %s", report.worker, report.reason)
            self.route("orchestrator", report)
        self._supervise_orchestrator(now)

    def _end_stalled(self, now: float) -> None:
        stalled = self.stalled_for()
        if stalled <= self.config.resilience.stall_timeout_s:
            return
        with self.lock:
            pending = list(self.requests.values())
        log.error("no token for %.0f s: ending %d requests with an error", stalled, len(pending))
        for req in pending:
            self.end_with_error(req, f"the cluster produced no token for {stalled:.0f} s")
            self._token(req.req_id, now, counts=False)
            if not (req.worker in self.live_attention() and self.route(req.worker, P.AbortRequest([req.req_id]))):
                self._pending_aborts.append(req.req_id)

    def _supervise_orchestrator(self, now: float) -> None:
        dead = self.orch.poll() is not None
        silent = now - self.orch_seen > max(self.config.resilience.orchestrator_timeout_s,
                                            10.0 if now - self._orch_started < 10.0 else 0.0)
        if not (dead or silent) or self.config.cluster.launcher == "ray" or self.state is None:
            return  # Ray's workers are actors of their orchestrator's Ray job: they share its fate
        why = f"the orchestrator (pid {self.orch.pid}) " + (f"exited ({self.orch.returncode})" if dead else
                                                             f"was silent for {now - self.orch_seen:.1f} s")
        log.error("%s: starting a successor", why)
        self.orch.kill()  # fence a hung one: two must never act at once
        self.orch.wait()
        self.stats.orchestrator_restarts += 1
        self.stats.failed(Role.ORCHESTRATOR)
        st = self.state
        spec = msgspec.structs.replace(self.spec, adopt=list(st.workers), table_version=st.table_version, epoch=st.epoch,
                                       next_index=dict(st.next_index), fenced=list(st.fenced), replaced=why)
        self.orch = spawn(self.launcher.start, "tarragon.orchestrator", "orchestrator", spec)
        self._orch_started = self.orch_seen = time.monotonic()
        self.orch_heard = False


def _dtype(config: TarragonConfig) -> torch.dtype:
    from .weights import torch_dtype

    return torch_dtype(config.model.dtype)


def _cluster_key(run_dir: Path, key_file: str | None, insecure: bool) -> tuple[ClusterKey | None, str]:
    """The cluster's CURVE key and the file the orchestrator reads it from: `key_file` if it
    exists (workers that join by hand hold a copy), else a new key written there (0600), or in
    the 0700 run folder when no file is named."""
    if insecure:
        return None, ""
    path = Path(key_file) if key_file else run_dir / "cluster.key"
    if path.exists():
        return ClusterKey.load(path), str(path)
    key = ClusterKey.generate()
    key.save(path)
    return key, str(path)

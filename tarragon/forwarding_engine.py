"""The attention worker's forwarding engine: ships routed tokens to expert workers, and masks
their failures.

One channel per expert worker (EW): a local link (local_link.py) to an EW on this host, a ZMQ
DEALER socket to one on another host (tcp://); an independent point-to-point channel per AW-EW
pair, no collective group, so a dead peer breaks only its own channel. Every dispatch resolves
logical experts to physical workers through this worker's own routing table.

Failure handling lives here, on the waiting side:
- evidence: the channel reports the peer's disconnect (a killed process: EOF on a link), or a
  reply is owed and the peer stays silent past `probe_interval_s`, and then does not answer probes
  on its control channel for the probe timeout (a hung process, e.g. SIGSTOP; one on this host
  that is runnable, waiting for a CPU, is given up to the probe cap), or its replies are
  many times slower than its peers' for a sustained window (a gray failure: see timeouts.py);
- the probe timeout adapts: `probe_timeout_s` is its floor; it grows with the round trips seen
  from all expert workers (a machine slowed down as a whole fails nobody), and time this process
  itself was not running (a poll that returned late) does not count as the peer's silence;
- replay: the outstanding calls' very same hidden rows go to the next live candidate of each
  expert (a shadow), flagged so that worker serves them first; the orchestrator is told;
- a late reply of a worker already declared failed is dropped, never applied twice;
- with no live candidate (no shadows), calls wait for the orchestrator's next routing table.

The orchestrator's channel belongs to the attention worker: while a call waits, the engine wakes
on it too (`wake_on`) and hands it to the worker, which applies a routing table, or tells the
engine to stop waiting (a shutdown): then `result()` returns None and the worker's loop ends.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import local_link
from . import protocol as P
from .local_link import POLLIN, SPIN_S, Link, poll_spinning
from .model import MoECall
from .procfs import CpuDemand
from .routing_table import RoutingTable
from .sockets import DATA_MAX_BYTES, Context, Received, make_socket, recv, validate
from .timeouts import PROBE_CAP_S, AdaptiveTimeout, GrayDetector, runnable

log = logging.getLogger(__name__)
# A wait for expert workers' replies polls for local_link.SPIN_S before it sleeps (see
# ForwardingEngine._poll): +9-13 % tok/s at 1-2 requests on 2 cores (2 x 2, alternated).
SPIN_WORTH = 5.0  # ... only while replies come within this many times that on average (a busy machine: no spin)


@dataclass(eq=False)
class _Part:
    """One message to one EW: rows for `experts` (`counts` rows each) of `layer`."""

    call_id: int
    worker: str
    layer: int
    experts: list[int]
    counts: list[int]
    hidden: torch.Tensor  # kept until answered, for replay
    sent_at: float
    redirected: list["_Part"] = field(default_factory=list)  # set when replayed elsewhere


class ExpertFuture:
    """The combined expert output of one MoE call, once every part is answered."""

    def __init__(self, engine: "ForwardingEngine", parts: list[_Part], token_of_row: torch.Tensor, row_weights: torch.Tensor, like: torch.Tensor):
        self.engine, self.parts = engine, parts
        self.token_of_row, self.row_weights, self.like = token_of_row, row_weights, like
        self.outs: list[torch.Tensor] = []  # the parts answered so far, in order

    def result(self) -> torch.Tensor | None:
        """The combined output; None if the wait was interrupted (the worker is shutting down)."""
        while len(self.outs) < len(self.parts):
            out = self.engine.wait(self.parts[len(self.outs)])
            if out is None:
                return None
            self.outs.append(out)
        rows = P.to_device(self.outs[0] if len(self.outs) == 1 else torch.cat(self.outs), self.like.device)
        weighted = rows * self.row_weights  # [rows, 1]: each row's routing weight
        return torch.zeros_like(self.like).index_add_(0, self.token_of_row, weighted.to(self.like.dtype))


class ForwardingEngine:
    def __init__(self, name: str, table: RoutingTable, endpoints: dict[str, str], ctx: Context,
                 probe_endpoints: dict[str, str], report: Callable[[P.Msg], None], probe_interval_s: float = 0.01,
                 probe_timeout_s: float = 0.1, give_up_s: float = 300.0):
        self.name, self.ctx, self.report = name, ctx, report  # report: the worker's evidence, to the orchestrator
        self.table = table
        self.failed: set[str] = set()
        self.probe_interval_s, self.give_up_s = probe_interval_s, give_up_s
        self.probe_timeout = AdaptiveTimeout(probe_timeout_s, PROBE_CAP_S)  # learns from every round trip
        self.gray = GrayDetector()
        self.last_poll = time.monotonic()
        self.poller = zmq.Poller()
        self.control: tuple[zmq.Socket, Callable[[], bool]] | None = None  # see wake_on
        self.data: dict[str, Link | zmq.Socket] = {}
        self.probes: dict[str, zmq.Socket] = {}
        self.monitors: dict[zmq.Socket, str] = {}
        self.links: dict[int, Link] = {}  # by file descriptor, as the poller reports them
        self.connecting: list[Link] = []  # links whose expert worker did not listen yet
        self.owner_of: dict[Link | zmq.Socket, str] = {}
        self.suspect_since: dict[str, float] = {}  # worker -> first unanswered probe
        self.last_probe: dict[str, float] = {}
        self.expected: dict[int, _Part] = {}
        self.replies: dict[int, torch.Tensor] = {}
        self.waiting_for_table: list[_Part] = []
        self.next_id = 0
        self.replayed = 0  # calls replayed to another worker (a metric)
        self.linger = False  # tell the expert workers that this worker's next call follows at once (see ExpertRequest)
        self.prefer: str | None = None  # serves every expert it has a live copy of (see RoutingTable.owners)
        self._owners: dict[tuple[int, str | None], list[str | None]] = {}  # see _send_runs
        self.round_trip = 0.0  # moving average of the replies' round trips, seconds (see wait)
        self.cpu = CpuDemand()  # (see wait: no polling while another task waits for a CPU)
        self.probe_endpoints = dict(probe_endpoints)
        for worker, endpoint in endpoints.items():
            self._connect(worker, endpoint)

    # ---- channels -------------------------------------------------------------------------

    def _socket(self, endpoint: str, worker: str) -> zmq.Socket:
        s = make_socket(self.ctx, zmq.DEALER, connect=endpoint, identity=self.name, max_bytes=DATA_MAX_BYTES)
        self.poller.register(s, zmq.POLLIN)
        self.owner_of[s] = worker
        return s

    def _connect(self, worker: str, endpoint: str) -> None:
        if local_link.is_local(endpoint):
            s = local_link.connect(endpoint, self.name, self.poller, worker)
            if s.sock is None:
                self.connecting.append(s)  # its expert worker is still starting: see wait()
            else:
                self.links[s.fd] = s
            self.owner_of[s] = worker
        else:
            s = self._socket(endpoint, worker)
            mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.poller.register(mon, zmq.POLLIN)
            self.monitors[mon] = worker
        self.data[worker] = s
        self.probes[worker] = self._socket(self.probe_endpoints[worker], worker)

    def _disconnect(self, worker: str) -> None:
        s = self.data.pop(worker, None)
        if s is None:
            return
        if isinstance(s, Link):
            self.links.pop(s.fd, None)
            if s in self.connecting:
                self.connecting.remove(s)
            del self.owner_of[s]
            s.close()
        for mon, w in list(self.monitors.items()):
            if w == worker:
                self.poller.unregister(mon)
                del self.monitors[mon]
                s.disable_monitor()
                mon.close(0)
        for sock in (s, self.probes.pop(worker)):
            if isinstance(sock, zmq.Socket):
                self.poller.unregister(sock)
                del self.owner_of[sock]
                sock.close(0)

    def apply_update(self, update: P.TableUpdate) -> None:
        """Adopt the orchestrator's table if newer: connect to new workers, drop dead ones."""
        if update.table.version <= self.table.version:
            return
        self.table = update.table
        self._owners.clear()
        self.probe_endpoints.update(update.probe_endpoints)
        for worker, endpoint in update.endpoints.items():
            if worker not in self.data and worker not in self.failed:
                self._connect(worker, endpoint)
        for worker in list(self.data):
            if worker not in update.endpoints:
                self._fail(worker, "removed by the orchestrator", tell=False)
        log.info("%s: routing table v%d", self.name, self.table.version)
        pending, self.waiting_for_table = self.waiting_for_table, []
        for part in pending:
            self._replay(part)

    def wake_on(self, sock: zmq.Socket, handle: Callable[[], bool]) -> None:
        """While a call waits, also wake when `sock` (the worker's control channel) is readable,
        and call `handle`: it reads the socket (a routing table may be what the call waits
        for, see `apply_update`) and returns False to stop waiting."""
        self.poller.register(sock, zmq.POLLIN)
        self.control = (sock, handle)

    # ---- dispatch -------------------------------------------------------------------------

    def dispatch(self, call: MoECall) -> ExpertFuture:
        """Send each expert worker its rows: one message per worker, rows grouped by expert.
        The grouping is done on Python lists: a decode step routes a few rows, for which each
        torch op (argsort, bincount, division ...) costs more than the work."""
        k = call.expert_ids.shape[1]
        by_expert: dict[int, list[int]] = {}
        for i, e in enumerate(call.expert_ids.reshape(-1).tolist()):
            by_expert.setdefault(e, []).append(i)
        experts = sorted(by_expert)
        order = [i for e in experts for i in by_expert[e]]  # (token, choice) pairs, grouped by expert
        counts = [len(by_expert[e]) for e in experts]
        device = call.hidden.device
        token_of_row = torch.tensor([i // k for i in order], device=device)
        row_weights = call.weights.reshape(-1, 1).index_select(0, torch.tensor(order, device=device))
        rows = P.to_host(call.hidden.index_select(0, token_of_row))  # kept on the host for replay
        sent = self._send_runs(call.layer, experts, counts, rows, replay=False)
        if not sent:  # some expert has no live copy: hold the call until the routing table changes
            held = _Part(-1, "", call.layer, experts, counts, rows, time.monotonic())
            self.waiting_for_table.append(held)
            sent = [held]
        return ExpertFuture(self, sent, token_of_row, row_weights, call.hidden)

    def _send_runs(self, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor, replay: bool) -> list[_Part]:
        """Split rows (grouped by expert, in `experts` order) into contiguous runs served by one
        worker each, and send every run. Returns the parts in row order, or [] if some expert
        has no live worker (then nothing is sent)."""
        key = (layer, self.prefer)
        owners = self._owners.get(key)
        if owners is None:  # (cached until the table, the failed set or the preference changes)
            owners = self._owners[key] = self.table.owners(layer, self.failed, self.prefer)
        if any(owners[e] is None for e in experts):
            return []
        parts: list[_Part] = []
        now = time.monotonic()
        for e, n in zip(experts, counts):
            if parts and parts[-1].worker == owners[e]:
                parts[-1].experts.append(e)
                parts[-1].counts.append(n)
            else:
                parts.append(_Part(self.next_id, owners[e], layer, [e], [n], rows, now))
                self.next_id += 1
        start = 0
        for p in parts:
            n = sum(p.counts)
            p.hidden = rows[start : start + n]
            start += n
            header = P.ExpertRequest(p.call_id, layer, p.experts, p.counts, P.tensor_meta(p.hidden), replay, self.linger)
            self.data[p.worker].send_multipart(P.encode(header, p.hidden), copy=False)
            self.expected[p.call_id] = p
        return parts

    # ---- waiting, detection, replay --------------------------------------------------------

    def wait(self, part: _Part) -> torch.Tensor | None:
        """The part's answer (from whichever worker serves it in the end); None once the control
        handler says to stop waiting."""
        deadline = time.monotonic() + self.give_up_s
        spin = SPIN_S > 0 and self.round_trip < SPIN_WORTH * SPIN_S and self.cpu.spare()
        spin_until = time.perf_counter() + (SPIN_S if spin else 0.0)
        while True:
            if part.call_id in self.replies:
                return self.replies.pop(part.call_id)
            if part.redirected:
                outs = []
                for p in part.redirected:
                    if (out := self.wait(p)) is None:
                        return None
                    outs.append(out)
                return outs[0] if len(outs) == 1 else torch.cat(outs)
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{self.name}: no expert worker answered layer {part.layer} for {self.give_up_s:.0f}s")
            if part.worker in self.failed and part not in self.waiting_for_table:
                self._replay(part)
                continue
            self._check_silence(part, now)
            if self.connecting:
                for link in [link for link in self.connecting if link.try_connect()]:
                    self.connecting.remove(link)
                    self.links[link.fd] = link
            events = self._poll(spin_until)
            self._discount_own_lag()
            for sock, flags in events:
                if self.control is not None and sock is self.control[0]:
                    if not self.control[1]():
                        return None
                elif isinstance(sock, int):  # a link's file descriptor
                    if sock in self.links:
                        self._drain(self.links[sock], flags)
                else:
                    self._drain(sock)

    def _poll(self, spin_until: float) -> list:
        """Poll the channels; until `spin_until`, without sleeping (local_link.poll_spinning).
        When replies take much longer (a loaded machine, large batches), or another task waits
        for a CPU (the expert workers computing, a replacement loading), a wait does not spin:
        it would only take CPU time from the processes that answer."""
        return poll_spinning(self.poller, spin_until, self.probe_interval_s * 1000)

    def _discount_own_lag(self) -> None:
        """A poll that returned much later than asked means this process was not running (a busy
        machine): peers' silence during that time is not evidence against them."""
        now = time.monotonic()
        lag = now - self.last_poll - 2 * self.probe_interval_s
        self.last_poll = now
        if lag > 0:
            for w in self.suspect_since:
                self.suspect_since[w] += lag

    def _check_silence(self, part: _Part, now: float) -> None:
        """Probe a worker that owes a reply and is silent; fail it if probes go unanswered."""
        w = part.worker
        if w in self.failed or part.call_id not in self.expected or now - part.sent_at < self.probe_interval_s:
            return
        since = self.suspect_since.setdefault(w, now)
        if now - since >= self.probe_timeout.value:
            # Read what has arrived before judging: if this process was not scheduled for a
            # while (a busy machine), a reply or pong may be waiting unread.
            for sock in (self.data[w], self.probes[w]):
                self._drain(sock)
            if w in self.suspect_since and not self._starved(w, now - since):
                self._fail(w, f"no reply and no answer to probes for {(now - since) * 1000:.0f} ms")
        elif now - self.last_probe.get(w, 0.0) >= self.probe_interval_s:
            self.last_probe[w] = now
            self.probes[w].send_multipart(P.encode(P.Probe(int(now * 1e6))))

    def _starved(self, worker: str, silent_s: float) -> bool:
        """A local expert worker silent because it waits for a CPU (runnable: a busy machine,
        not a hung or stopped process) is given up to the probe cap, as the orchestrator gives
        heartbeats. Found in a full test run on 2 cores: a new attention worker, its timeout at
        the floor, failed a healthy expert worker that had not run for 108 ms."""
        link = self.data.get(worker)
        pid = link.peer_pid if isinstance(link, Link) else 0
        return bool(pid) and pid != os.getpid() and silent_s < PROBE_CAP_S and runnable(pid)

    def _drain(self, sock: Link | zmq.Socket, flags: int = POLLIN) -> None:
        if sock in self.monitors:
            worker = self.monitors[sock]
            evt = recv_monitor_message(sock)
            if evt["event"] == zmq.EVENT_DISCONNECTED and worker not in self.failed:
                self._fail(worker, "channel disconnected")
            return
        worker = self.owner_of.get(sock)
        if isinstance(sock, Link):
            for frames in sock.service(flags):
                got = validate(frames, (P.ExpertReply,), f"{self.name} ({worker})", worker.encode(), partial(self._check_reply, worker))
                self.suspect_since.pop(worker, None)  # any answer proves it alive
                if got is not None:
                    self._accept(worker, got.msg, got.tensors[0])
                if worker in self.failed:  # (found slow)
                    return
            if sock.closed:
                self._fail(worker, "channel disconnected")
            return
        probe = sock is self.probes.get(worker)
        accept, check = ((P.Pong,), None) if probe else ((P.ExpertReply,), partial(self._check_reply, worker))
        while not sock.closed and sock.get(zmq.EVENTS) & POLLIN:  # (cheaper than reading until zmq.Again)
            got = recv(sock, accept, f"{self.name} ({worker})", zmq.NOBLOCK, check=check)
            self.suspect_since.pop(worker, None)  # any answer proves it alive
            if got is not None and probe:
                self.probe_timeout.observe(time.monotonic() - got.msg.seq / 1e6)
            elif got is not None:
                self._accept(worker, got.msg, got.tensors[0])

    def _check_reply(self, worker: str, got: Received) -> None:
        """Raises P.BadMessage unless this is the awaited answer of `worker`, in the call's shape."""
        part = self.expected.get(got.msg.call_id)
        if part is None or part.worker != worker:
            raise P.BadMessage(f"reply to unknown, replayed or finished call {got.msg.call_id} from {worker}")
        hidden = got.tensors[0]
        if hidden.shape != part.hidden.shape or hidden.dtype != part.hidden.dtype:
            raise P.BadMessage(f"reply of {hidden.dtype}{list(hidden.shape)} to a call of {list(part.hidden.shape)}")

    def _accept(self, worker: str, header: P.ExpertReply, hidden: torch.Tensor) -> None:
        part = self.expected.pop(header.call_id)
        self.replies[header.call_id] = hidden
        now = time.monotonic()
        self.round_trip += 0.1 * (now - part.sent_at - self.round_trip)
        self.probe_timeout.observe(now - part.sent_at, now)
        self.gray.observe(worker, now - part.sent_at, now)
        for slow, why in self.gray.slow(now):
            self._fail(slow, why, slow=True)

    def _fail(self, worker: str, reason: str, tell: bool = True, slow: bool = False) -> None:
        """This worker is failed for us: never send it anything again; replay what it owes."""
        if worker in self.failed:
            return
        since = self.suspect_since.pop(worker, None) or self.gray.slow_since.get(worker)
        detect_ms = (time.monotonic() - since) * 1000 if since else 0.0
        self.gray.forget(worker)
        self.failed.add(worker)
        self._owners.clear()
        log.warning("%s: expert worker %s failed: %s", self.name, worker, reason)
        if tell:
            self.report(P.WorkerFailed(worker, self.name, reason, detect_ms, slow))
        owed = [p for p in self.expected.values() if p.worker == worker]
        self._disconnect(worker)
        for p in owed:
            self._replay(p)

    def _replay(self, part: _Part) -> None:
        """Resend the part's very same rows to the next live candidates of its experts."""
        self.expected.pop(part.call_id, None)  # a late answer from the failed worker is dropped
        parts = self._send_runs(part.layer, part.experts, part.counts, part.hidden, replay=True)
        if not parts:
            if part not in self.waiting_for_table:
                log.warning("%s: no live copy of some expert of layer %d: waiting for the orchestrator", self.name, part.layer)
                self.waiting_for_table.append(part)
            return
        self.replayed += 1
        part.redirected = parts
        if part in self.waiting_for_table:
            self.waiting_for_table.remove(part)

    def close(self) -> None:
        for w in list(self.data):
            self._disconnect(w)

"""The attention worker's side of KV checkpointing: its channels to the checkpoint stores.

Every step's new KV goes to every store (each holds every checkpoint), without blocking: ZMQ's
I/O thread sends it, a full queue drops the write and that store keeps the committed prefix. So
one store may die and a restore still finds the committed KV in another, even before the dead
store's replacement is up. A store that (re)connects may know nothing (a replacement takes over
its predecessor's address): it gets the whole KV of every request this worker holds, from
position 0. A store that is down gets nothing meanwhile (its queue would only fill with writes
its successor cannot use).

Steps' KV is copied as each step ends and sent as one write per `interval_s` (and at once when
the worker goes idle, drains, aborts a request or a store reconnects): each write wakes every
store and a ZMQ thread on each side, which on a small machine take CPU the datapath wants (at
one or two requests, a write every 2.7 ms step cost 5-8 % of the tokens/s). A failure then
regenerates the tokens of at most that long past the committed one.

A restore asks every store that is up and installs the longest committed prefix, as soon as one
covers the whole request or every store asked has answered (or the restore times out). Stores
that answered less then get the installed KV, so they hold the request in full again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from .kv_cache import KVCache
from .scheduler import Scheduler, Sequence
from .sockets import DATA_MAX_BYTES, Context, make_socket, recv
from .vocabulary import EventKind

WATCHED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
MAX_FINISHED = 4096  # finished requests remembered for a store that is not taking writes
COALESCE_MAX_BYTES = 4 << 20  # steps' KV gathered into one write at most (larger steps go alone)


class StoreLink:
    """One checkpoint store as this worker writes to it."""

    def __init__(self, ctx: Context, endpoint: str, name: str, queue: int):
        self.sock = make_socket(ctx, zmq.DEALER, connect=endpoint, identity=name, max_bytes=DATA_MAX_BYTES, monitor=WATCHED,
                                send_queue=queue)
        self.events = self.sock.get_monitor_socket(WATCHED)
        self.endpoint = endpoint
        self.up = False  # connected (a store listens there)
        self.seq = 0  # write number: the store counts the gaps
        self.finished: list[str] = []  # requests done, to tell with the next write

    def send(self, req_ids: list[str], starts: list[int], counts: list[int], k: torch.Tensor, v: torch.Tensor) -> bool:
        msg = P.KVWrite(self.seq, req_ids, starts, counts, P.tensor_meta(k), P.tensor_meta(v), self.finished)
        self.seq += 1
        try:
            self.sock.send_multipart(P.encode(msg, k, v), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False  # the store is slow or stopped: inference goes on, those checkpoints stop growing
        self.finished = []
        return True

    def forget(self, req_ids: list[str]) -> None:
        """Requests that ended: their checkpoints are dropped with the next write. (A store down
        long enough forgets them anyway: its successor never holds them.)"""
        self.finished = (self.finished + req_ids)[-MAX_FINISHED:]


@dataclass
class Restore:
    seq: Sequence
    t0: float
    waiting: set[int]  # the links asked that have not answered yet
    answers: dict[int, int] = field(default_factory=dict)  # link -> committed length it has
    best: tuple[P.RestoreData, torch.Tensor, torch.Tensor] | None = None

    def complete(self) -> bool:
        """The longest answer covers every token but the last (whose KV the next step computes)."""
        return not self.waiting or (self.best is not None and self.best[0].committed >= self.seq.length - 1)


class Checkpointer:
    def __init__(self, ctx: Context, name: str, endpoints: list[str], queue: int, kv: KVCache, sched: Scheduler,
                 report: Callable[[EventKind, str, float], None], interval_s: float = 0.0):
        self.name, self.kv, self.sched, self.report = name, kv, sched, report
        self.ctx, self.queue = ctx, queue
        self.links = [StoreLink(ctx, e, name, queue) for e in endpoints]
        self.restoring: dict[str, Restore] = {}
        self.interval_s = interval_s
        self.pending: list[tuple[list[str], list[int], list[int], torch.Tensor, torch.Tensor]] = []  # steps not yet sent
        self.pending_bytes = 0
        self.sent_at = 0.0

    def sockets(self) -> list[zmq.Socket]:
        return [link.sock for link in self.links]

    def retarget(self, endpoints: list[str]) -> list[tuple[zmq.Socket, zmq.Socket]]:
        """A store replaced at another address (its host was lost): a new link there, re-filled
        once it connects like any store that (re)connects. Returns (old, new) sockets."""
        swapped = []
        for i, endpoint in enumerate(endpoints[:len(self.links)]):
            old = self.links[i]
            if endpoint == old.endpoint:
                continue
            self.links[i] = StoreLink(self.ctx, endpoint, self.name, self.queue)
            for r in self.restoring.values():  # the old one will not answer
                r.waiting.discard(i)
            old.events.close(linger=0)
            old.sock.close(linger=0)
            swapped.append((old.sock, self.links[i].sock))
        return swapped

    def write(self, req_ids: list[str], starts: list[int], counts: list[int], slots: torch.Tensor, finished: list[str]) -> None:
        """One step's new KV (copied now: its slots may be reused), for every store that is up:
        sent with the steps before it once `interval_s` has passed since the last write."""
        self.watch()
        for link in self.links:
            link.forget(finished)
        if any(link.up for link in self.links):
            k, v = self.kv.k.index_select(1, slots), self.kv.v.index_select(1, slots)
            self.pending.append((req_ids, starts, counts, k, v))
            self.pending_bytes += k.nbytes + v.nbytes
        if time.monotonic() - self.sent_at >= self.interval_s or self.pending_bytes >= COALESCE_MAX_BYTES:
            self.send_pending()

    def send_pending(self) -> None:
        """The steps gathered so far, as one write to every store that is up (with the requests
        finished meanwhile, if no step is)."""
        if len(self.pending) == 1:
            req_ids, starts, counts, k, v = self.pending[0]
        elif self.pending:
            req_ids, starts, counts = ([x for p in self.pending for x in p[i]] for i in range(3))
            k, v = torch.cat([p[3] for p in self.pending], 1), torch.cat([p[4] for p in self.pending], 1)
        elif any(link.finished for link in self.links):
            req_ids, starts, counts, k, v = [], [], [], self.kv.k[:, :0], self.kv.v[:, :0]
        else:
            return
        for link in self.links:
            if link.up:
                link.send(req_ids, starts, counts, k, v)
        self.pending.clear()
        self.pending_bytes, self.sent_at = 0, time.monotonic()

    def forget(self, req_ids: list[str]) -> None:
        """Aborted requests: their checkpoints are dropped now (a write with no KV carries them;
        the worker may have no next step to carry them)."""
        self.watch()
        for link in self.links:
            link.forget(req_ids)
        self.send_pending()

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Whether every write sent so far has reached every store that is up: an empty restore
        request, sent behind them on each channel, is answered after them (a drain relies on it;
        restores in progress are dropped meanwhile, the drain hands their requests back)."""
        self.watch()
        self.send_pending()
        pending = {link.sock: link for link in self.links if link.up}
        poller = zmq.Poller()
        for sock in pending:
            sock.send_multipart(P.encode(P.RestoreRequest("")))
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while pending and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(left * 1000):
                got = recv(sock, (P.RestoreData,), f"{self.name} (store)")
                if got is not None and got.msg.req_id == "" and sock in pending:
                    del pending[sock]
                    poller.unregister(sock)
        return not pending

    def watch(self) -> None:
        """Follow each store's connection: a store that (re)connects gets every request's KV."""
        for i, link in enumerate(self.links):
            while link.events.poll(0):
                event = recv_monitor_message(link.events)["event"]
                if event == zmq.EVENT_CONNECTED and not link.up:
                    self.send_pending()  # to the others: its re-fill below holds those steps
                link.up = event == zmq.EVENT_CONNECTED
                held = [s for s in [*self.sched.running, *self.sched.waiting] if s.num_computed > 0 and s.blocks]
                if link.up and held:
                    sent = all([self.refill(link, [s]) for s in held])  # one message per request: each within the size limit
                    self.report(EventKind.STORE_REFILLED if sent else EventKind.STORE_REFILL_DROPPED,
                                f"{link.endpoint.rsplit('/', 1)[-1]}: {len(held)} requests, {sum(s.num_computed for s in held)} positions", 0.0)
                else:
                    for r in self.restoring.values():  # a dead store never answers
                        r.waiting.discard(i)

    def refill(self, link: StoreLink, seqs: list[Sequence]) -> bool:
        """Write the computed KV of `seqs` from position 0."""
        counts = [s.num_computed for s in seqs]
        slots = torch.cat([self.kv.slots(s.blocks, 0, c) for s, c in zip(seqs, counts)]).to(self.kv.k.device)
        k, v = self.kv.k.index_select(1, slots), self.kv.v.index_select(1, slots)
        return link.send([s.req_id for s in seqs], [0] * len(seqs), counts, k, v)

    # ---- restores -------------------------------------------------------------------------

    def restore(self, seq: Sequence) -> None:
        """Ask every store that is up (none up: every store, one may be connecting) for the
        request's committed KV."""
        self.watch()
        asked = {i for i, link in enumerate(self.links) if link.up} or set(range(len(self.links)))
        for i in asked:
            self.links[i].sock.send_multipart(P.encode(P.RestoreRequest(seq.req_id)))
        self.restoring[seq.req_id] = Restore(seq, time.monotonic(), asked)

    def receive(self, timeout_s: float) -> list[Restore]:
        """Restores that are settled: complete, answered by every store asked, or overdue."""
        self.watch()
        for i, link in enumerate(self.links):
            while link.sock.poll(0):
                got = recv(link.sock, (P.RestoreData,), f"{self.name} (store)")
                r = self.restoring.get(got.msg.req_id) if got is not None else None
                if r is None or i not in r.waiting:
                    continue
                r.waiting.discard(i)
                r.answers[i] = got.msg.committed
                if got.msg.committed > (r.best[0].committed if r.best else 0):
                    r.best = (got.msg, *got.tensors)
        now = time.monotonic()
        done = [r for r in self.restoring.values() if r.complete() or now - r.t0 > timeout_s]
        for r in done:
            del self.restoring[r.seq.req_id]
            if not r.complete():
                self.report(EventKind.RESTORE_TIMEOUT, f"{r.seq.req_id}: {len(r.waiting)} store(s) silent", (now - r.t0) * 1000)
        return done

    def complete_copies(self, r: Restore) -> None:
        """After an install: stores that are up and held less get the installed prefix."""
        for i, link in enumerate(self.links):
            if r.seq.num_computed and link.up and r.answers.get(i, 0) < r.seq.num_computed:
                self.refill(link, [r.seq])

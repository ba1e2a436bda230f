"""The checkpoint store: its own process (another host in production), holding every attention
worker's KV cache as it grows, so a dead worker's requests resume elsewhere from their last
committed token instead of being re-prefilled. There are several (two by default): each
attention worker writes every checkpoint to each of them (see checkpointer), so a store's death
loses nothing, and its replacement, which takes over its address, is re-filled by the workers.

Writes arrive as each step's new KV (all layers at once, so arrival commits them); per request
the store keeps the contiguous prefix it has, `committed` tokens long. A write that would leave a
hole (an earlier write was dropped under back-pressure, or this store replaced a dead one) or
that does not fit the byte budget freezes the request at its committed prefix: it stays
restorable up to there, the rest is recomputed. Finished requests are dropped. Memory never
grows past `store_max_bytes`: each request's KV is copied out of the write that carried it (a view
would keep the whole write alive), so the bytes accounted are the bytes held.

Each checkpoint belongs to the attention worker that wrote it first; only that owner may extend,
drop or restore it, until the driver moves the request (`Handover`, relayed by the orchestrator).
A restore asked by a worker that is not (yet) the owner waits briefly for that handover, which
races the request itself; then it gets nothing (and recomputes).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import zmq

from . import protocol as P
from .sockets import DATA_MAX_BYTES, Context, Received, make_socket, recv
from .vocabulary import Role
from .worker import OrchestratorChannel, WorkerSpec, restore_priority

HANDOVER_WAIT_S = 0.5  # how long a restore by a worker not (yet) the owner waits for the handover
FROM_ATTENTION = (P.KVWrite, P.RestoreRequest)
FROM_ORCHESTRATOR = (P.Shutdown, P.Handover, P.Fence)
COMPACT_AFTER = 64  # segments per request before they are joined into one tensor


@dataclass
class Checkpoint:
    owner: str
    # Segments [layers, n, heads, dim], each its own copy, in position order.
    # (MLA: k holds the latent, v the rotated key: shapes differ past the position axis.)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    committed: int = 0
    frozen: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)


class CheckpointStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.requests: dict[str, Checkpoint] = {}
        self.bytes = 0
        self.refused = 0  # writes refused (budget) or unusable (holes)
        self.last_seq: dict[str, int] = {}
        self.gaps = 0  # writes an attention worker dropped under back-pressure
        self.foreign = 0  # writes to, or drops of, a request another worker owns: refused
        self.parked: list[tuple[bytes, str, float]] = []  # (requester's identity, req_id, since): awaiting a handover
        self.fenced: set[str] = set()  # attention workers declared failed: they write, drop and restore nothing

    def write(self, owner: str, msg: P.KVWrite, k: torch.Tensor, v: torch.Tensor) -> None:
        last = self.last_seq.get(owner)
        if last is not None and msg.seq > last + 1:
            self.gaps += msg.seq - last - 1
        self.last_seq[owner] = msg.seq
        offset = 0
        for req_id, start, n in zip(msg.req_ids, msg.starts, msg.counts):
            kc, vc = k[:, offset : offset + n], v[:, offset : offset + n]
            offset += n
            cp = self.requests.get(req_id)
            if cp is not None and not self.owned_by(cp, owner):
                self.foreign += 1
                continue
            if cp is None or start == 0:  # new, or recomputed from scratch after a preemption
                if cp is not None:
                    self.drop(req_id)
                cp = self.requests[req_id] = Checkpoint(owner)
            if start < cp.committed:
                self._truncate(cp, start)
            unlike = bool(cp.k) and any(held.dtype != new.dtype or held.shape[0] != new.shape[0] or held.shape[2:] != new.shape[2:]
                                        for held, new in ((cp.k[0], kc), (cp.v[0], vc)))
            if cp.frozen or unlike or start > cp.committed or self.bytes + kc.nbytes + vc.nbytes > self.max_bytes:
                cp.frozen = True  # a hole, a misfit, or over budget: restorable up to its committed prefix
                self.refused += 1
                continue
            cp.k.append(kc.clone())  # out of the network buffer
            cp.v.append(vc.clone())
            cp.committed += n
            self.bytes += kc.nbytes + vc.nbytes
            if len(cp.k) > COMPACT_AFTER:  # one tensor object per token would cost more than the KV
                cp.k, cp.v = [torch.cat(cp.k, dim=1)], [torch.cat(cp.v, dim=1)]
        for req_id in msg.finished:
            if self.owned_by(self.requests.get(req_id, Checkpoint(owner)), owner):
                self.drop(req_id)
            else:
                self.foreign += 1

    def hand_over(self, msg: P.Handover) -> None:
        for req_id in msg.req_ids:
            cp = self.requests.get(req_id)
            if cp is not None:
                cp.owner = msg.owner

    def owned_by(self, cp: Checkpoint, worker: str) -> bool:
        """Whether `worker` may touch `cp`. A fenced owner's checkpoints go to the first live worker
        that touches them: the driver moved each request to exactly one, and its handover (relayed
        by the orchestrator) may arrive after that worker's first write, drop or restore."""
        if cp.owner in self.fenced and worker not in self.fenced:
            cp.owner = worker
        return cp.owner == worker

    def may_restore(self, requester: str, req_id: str) -> bool:
        cp = self.requests.get(req_id)
        return cp is None or self.owned_by(cp, requester)

    def due_restores(self, now: float) -> list[tuple[bytes, str, bool]]:
        """Parked restores that can be answered: (requester, req_id, with its KV or with nothing)."""
        def allowed(who: bytes, req_id: str) -> bool:
            return self.may_restore(who.decode(errors="replace"), req_id)

        due = [(who, r, allowed(who, r)) for who, r, t in self.parked if allowed(who, r) or now - t > HANDOVER_WAIT_S]
        done = {(who, r) for who, r, _ in due}
        self.parked = [p for p in self.parked if (p[0], p[1]) not in done]
        return due

    def _truncate(self, cp: Checkpoint, length: int) -> None:
        self.bytes -= cp.nbytes
        k, v = torch.cat(cp.k, dim=1)[:, :length], torch.cat(cp.v, dim=1)[:, :length]
        cp.k, cp.v, cp.committed = [k.clone()], [v.clone()], length
        self.bytes += cp.nbytes

    def drop(self, req_id: str) -> None:
        cp = self.requests.pop(req_id, None)
        if cp is not None:
            self.bytes -= cp.nbytes

    def restore(self, req_id: str) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        cp = self.requests.get(req_id)
        if cp is None or cp.committed == 0:
            return 0, None, None
        return cp.committed, torch.cat(cp.k, dim=1), torch.cat(cp.v, dim=1)

    def stats(self) -> dict[str, int]:
        return {"bytes": self.bytes, "max_bytes": self.max_bytes, "requests": len(self.requests),
                "positions": sum(cp.committed for cp in self.requests.values()),
                "refused": self.refused, "gaps": self.gaps, "foreign": self.foreign}


def run(spec: WorkerSpec, ctx: Context, orch: OrchestratorChannel) -> None:
    store = CheckpointStore(spec.store_max_bytes)
    sock = make_socket(ctx, zmq.ROUTER, bind=spec.endpoint, max_bytes=DATA_MAX_BYTES)
    orch.send(P.Ready(spec.name, Role.STORE, os.getpid(), store.stats()))
    restore_priority(spec)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(orch.sock, zmq.POLLIN)
    next_stats = 0.0
    while True:
        events = dict(poller.poll(timeout=50 if store.parked else 500))
        if orch.sock in events:
            got = recv(orch.sock, FROM_ORCHESTRATOR, spec.name)
            if got is not None and isinstance(got.msg, P.Shutdown):
                return
            if got is not None and isinstance(got.msg, P.Fence):
                store.fenced = set(got.msg.workers)
            elif got is not None:
                store.hand_over(got.msg)
        for _ in range(1000 if sock in events else 0):  # every write already here goes in before any restore is answered
            if not sock.poll(0):
                break
            got = recv(sock, FROM_ATTENTION, spec.name, check=check_write)
            if got is not None:
                serve(store, got)
        for requester, req_id, allowed in store.due_restores(time.monotonic()):
            answer_restore(store, sock, requester, req_id, allowed)
        if time.monotonic() >= next_stats:  # byte accounting, for /metrics and llm.workers()
            orch.send(P.Ready(spec.name, Role.STORE, os.getpid(), store.stats()))
            next_stats = time.monotonic() + 0.5


def check_write(got: Received) -> None:
    """Raises P.BadMessage unless a KVWrite's tensors hold the positions it lists."""
    msg = got.msg
    if not isinstance(msg, P.KVWrite):
        return
    k, v = got.tensors
    if k.shape[:2] != v.shape[:2] or k.dim() != 4 or v.dim() != 4 or k.shape[1] != sum(msg.counts) \
            or min(msg.counts, default=0) < 0 \
            or not len(msg.req_ids) == len(msg.starts) == len(msg.counts) or min(msg.starts, default=0) < 0:
        raise P.BadMessage(f"KV of shape {list(k.shape)} for {sum(msg.counts)} positions")


def serve(store: CheckpointStore, got: Received) -> None:
    """A write goes in at once; a restore is answered once the writes that arrived with it are in
    (`due_restores`). A fenced worker's messages are dropped: cut off and declared failed, it may
    still reach this store, and its requests are someone else's now."""
    if got.sender in store.fenced:
        store.foreign += 1
        return
    if isinstance(got.msg, P.RestoreRequest):
        if len(store.parked) < 4096:
            store.parked.append((got.identity, got.msg.req_id, time.monotonic()))
        return
    store.write(got.sender, got.msg, *got.tensors)


def answer_restore(store: CheckpointStore, sock: zmq.Socket, requester: bytes, req_id: str, allowed: bool) -> None:
    """Send a request's committed KV, or nothing (committed 0) to a worker that does not own it."""
    committed, k, v = store.restore(req_id) if allowed else (0, None, None)
    k = k if k is not None else torch.empty(0)
    v = v if v is not None else torch.empty(0)
    header = P.RestoreData(req_id, committed, P.tensor_meta(k), P.tensor_meta(v))
    sock.send_multipart([requester, *P.encode(header, k, v)], copy=False)

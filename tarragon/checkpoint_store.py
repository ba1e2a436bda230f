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
would keep the whole write alive) into one buffer of its own, which doubles when full (or grows
just enough, near the budget; a frozen request gives its spare room back); the bytes accounted
are those buffers' whole capacity, so they are the bytes held.

Each checkpoint belongs to the attention worker that wrote it first; only that owner may extend,
drop or restore it, until the driver moves the request (`Handover`, relayed by the orchestrator).
A restore asked by a worker that is not (yet) the owner waits briefly for that handover, which
races the request itself; then it gets nothing (and recomputes).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from . import protocol as P
from .sockets import DATA_MAX_BYTES, Context, Received, make_socket, recv
from .vocabulary import Role
from .worker import OrchestratorChannel, WorkerSpec, restore_priority

HANDOVER_WAIT_S = 0.5  # how long a restore by a worker not (yet) the owner waits for the handover
FROM_ATTENTION = (P.KVWrite, P.RestoreRequest)
FROM_ORCHESTRATOR = (P.Shutdown, P.Handover, P.Fence)
GROWTH = 2  # a checkpoint's buffer grows by this factor: an append is a copy into a slice, amortized O(1)


@dataclass(slots=True)
class Checkpoint:
    owner: str
    # The KV layout its writes share: (dtype, layers, dims past the position axis) of k, then of v.
    # (MLA: k holds the latent, v the rotated key: shapes differ past the position axis.)
    layout: tuple = ()
    # Buffers [layers, capacity, *dims]; positions [0, committed) are the checkpoint, the rest is
    # room to grow (held, so accounted). kb and vb: the same memory as bytes [layers, capacity, row],
    # for copies at numpy's cost per call rather than torch's (~10x less for a 2 KiB slice).
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    kb: np.ndarray | None = None
    vb: np.ndarray | None = None
    capacity: int = 0  # positions the buffers hold
    committed: int = 0
    frozen: bool = False

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes if self.k is not None else 0


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """`t` [layers, n, *dims] as the bytes [layers, n, row] it holds (any dtype, bf16 too)."""
    row = math.prod(t.shape[2:]) * t.element_size()
    if not t.numel():
        return np.empty((t.shape[0], t.shape[1], row), np.uint8)
    return t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], t.shape[1], row)


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
        """Append each request's positions to its checkpoint. The layout is read once per write
        (every request in it shares it); per request, one copy of k and one of v into its buffer."""
        last = self.last_seq.get(owner)
        if last is not None and msg.seq > last + 1:
            self.gaps += msg.seq - last - 1
        self.last_seq[owner] = msg.seq
        layout = (k.dtype, k.shape[0], tuple(k.shape[2:]), v.dtype, v.shape[0], tuple(v.shape[2:]))
        kb, vb = as_bytes(k), as_bytes(v)
        offset = 0
        for req_id, start, n in zip(msg.req_ids, msg.starts, msg.counts):
            offset += n
            cp = self.requests.get(req_id)
            if cp is not None and not self.owned_by(cp, owner):
                self.foreign += 1
                continue
            if cp is None or start == 0:  # new, or recomputed from scratch after a preemption
                if cp is not None:
                    self.drop(req_id)
                cp = self.requests[req_id] = Checkpoint(owner, layout)
            if start < cp.committed:  # recomputed from `start` (a preemption): the rest is stale
                cp.committed = start
            end = start + n
            if cp.frozen or cp.layout != layout or start > cp.committed or (end > cp.capacity and not self._grow(cp, end)):
                self._freeze(cp)  # a hole, a misfit, or over budget: restorable up to its committed prefix
                continue
            if n:
                cp.kb[:, start:end] = kb[:, offset - n:offset]  # out of the network buffer
                cp.vb[:, start:end] = vb[:, offset - n:offset]
                cp.committed = end
        for req_id in msg.finished:
            if self.owned_by(self.requests.get(req_id, Checkpoint(owner)), owner):
                self.drop(req_id)
            else:
                self.foreign += 1

    def _grow(self, cp: Checkpoint, need: int) -> bool:
        """Room for positions [0, need): GROWTH times the capacity, or just `need` where that
        would not fit the budget; False (nothing changes) if even that does not."""
        dtype_k, layers_k, dims_k, dtype_v, layers_v, dims_v = cp.layout
        per_position = layers_k * math.prod(dims_k) * dtype_k.itemsize + layers_v * math.prod(dims_v) * dtype_v.itemsize
        for capacity in (max(need, GROWTH * cp.capacity), need):
            if self.bytes + (capacity - cp.capacity) * per_position <= self.max_bytes:
                self._resize(cp, capacity)
                return True
        return False

    def _resize(self, cp: Checkpoint, capacity: int) -> None:
        """New buffers of `capacity` positions holding the committed prefix."""
        dtype_k, layers_k, dims_k, dtype_v, layers_v, dims_v = cp.layout
        k = torch.empty((layers_k, capacity, *dims_k), dtype=dtype_k)
        v = torch.empty((layers_v, capacity, *dims_v), dtype=dtype_v)
        kb, vb = as_bytes(k), as_bytes(v)
        if cp.committed:
            kb[:, :cp.committed], vb[:, :cp.committed] = cp.kb[:, :cp.committed], cp.vb[:, :cp.committed]
        self.bytes += k.nbytes + v.nbytes - cp.nbytes
        cp.k, cp.v, cp.kb, cp.vb, cp.capacity = k, v, kb, vb, capacity

    def _freeze(self, cp: Checkpoint) -> None:
        """No more writes until it is recomputed from scratch: its room to grow is given back."""
        if not cp.frozen and cp.capacity > cp.committed:
            self._resize(cp, cp.committed)
        cp.frozen = True
        self.refused += 1

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

    def drop(self, req_id: str) -> None:
        cp = self.requests.pop(req_id, None)
        if cp is not None:
            self.bytes -= cp.nbytes

    def restore(self, req_id: str) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """The committed prefix, copied (it is sent without a copy while the buffer may grow)."""
        cp = self.requests.get(req_id)
        if cp is None or cp.committed == 0:
            return 0, None, None
        n = cp.committed
        return n, cp.k[:, :n].clone(memory_format=torch.contiguous_format), cp.v[:, :n].clone(memory_format=torch.contiguous_format)

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

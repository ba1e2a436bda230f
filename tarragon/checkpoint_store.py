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
would keep the whole write alive) into chunks of its own: its first write exactly, then CHUNK
positions at a time (just what a write needs, near the budget; a frozen request gives its spare
room back), so a decode step costs one copy per request and growing copies nothing. The bytes
accounted are the chunks' whole size, so they are the bytes held.

Each checkpoint belongs to the attention worker that wrote it first; only that owner may extend,
drop or restore it, until the driver moves the request (`Handover`, relayed by the orchestrator).
A restore asked by a worker that is not (yet) the owner waits briefly for that handover, which
races the request itself; then it gets nothing (and recomputes).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import zmq

from . import protocol as P
from .sockets import DATA_MAX_BYTES, Context, Received, make_socket, recv
from .vocabulary import Role
from .worker import OrchestratorChannel, WorkerSpec, keep_freed_memory, loaded

HANDOVER_WAIT_S = 0.5  # how long a restore by a worker not (yet) the owner waits for the handover
FROM_ATTENTION = (P.KVWrite, P.RestoreRequest)
FROM_ORCHESTRATOR = (P.Shutdown, P.Handover, P.Fence)
CHUNK = 32  # positions a checkpoint grows by (more if one write needs more), in a chunk of its own: nothing is copied
HEAP_KEEP_BYTES = 64 << 20  # freed memory the store's allocator keeps for the next chunks (see keep_freed_memory)


class Layout(NamedTuple):
    """What k (or v) holds per position: its dtype (by name), layers, the dims past the position
    axis, and the bytes of one position in one layer."""

    dtype: str
    layers: int
    dims: tuple[int, ...]
    row: int

    @classmethod
    def of(cls, dtype: str, shape: Sequence[int], itemsize: int) -> Layout:
        return cls(dtype, shape[0], tuple(shape[2:]), math.prod(shape[2:]) * itemsize)

    def tensor(self, parts: list[np.ndarray]) -> torch.Tensor:
        """Byte arrays [layers, n_i, row], in position order, as one new tensor [layers, sum n_i, *dims]."""
        b = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0].copy()
        return torch.from_numpy(b).view(getattr(torch, self.dtype)).reshape(b.shape[0], b.shape[1], *self.dims)


class Chunk(NamedTuple):
    """KV of positions [base, base + size) as bytes [layers, size, row]: numpy allocates and
    copies a 2 KiB slice for a tenth of torch's cost per call; restores view them as tensors."""

    base: int
    kb: np.ndarray
    vb: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.kb.nbytes + self.vb.nbytes

    @classmethod
    def new(cls, layout: tuple[Layout, Layout], base: int, size: int) -> Chunk:
        k, v = layout
        return cls(base, np.empty((k.layers, size, k.row), np.uint8), np.empty((v.layers, size, v.row), np.uint8))


@dataclass(slots=True)
class Checkpoint:
    owner: str
    # The layout of k and of v that its writes share. (MLA: k holds the latent, v the rotated key.)
    layout: tuple[Layout, Layout]
    # In position order; positions [0, committed) are the checkpoint, the rest of the last chunk
    # is room to grow (held, so accounted).
    chunks: list[Chunk] = field(default_factory=list)
    kb: np.ndarray | None = None  # the last chunk's, and its first position
    vb: np.ndarray | None = None
    base: int = 0
    capacity: int = 0  # positions the chunks hold
    committed: int = 0
    frozen: bool = False

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def pop(self) -> Chunk:
        chunk = self.chunks.pop()
        self._last()
        return chunk

    def push(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self._last()

    def _last(self) -> None:
        last = self.chunks[-1] if self.chunks else None
        self.kb, self.vb = (last.kb, last.vb) if last else (None, None)
        self.base = last.base if last else 0
        self.capacity = last.base + last.kb.shape[1] if last else 0


def tensor_bytes(t: torch.Tensor) -> tuple[Layout, np.ndarray]:
    """A tensor [layers, n, *dims] (any dtype, bf16 too): its layout and its bytes [layers, n, row]."""
    layout = Layout.of(str(t.dtype).removeprefix("torch."), t.shape, t.element_size())
    if not t.numel():
        return layout, np.empty((t.shape[0], t.shape[1], layout.row), np.uint8)
    return layout, t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], t.shape[1], layout.row)


def frame_bytes(meta: P.TensorMeta, buf: memoryview) -> tuple[Layout, np.ndarray]:
    """A received frame (checked by `check_write`): its layout and its bytes [layers, n, row]."""
    layout = Layout.of(meta.dtype, meta.shape, P.DTYPE_SIZES[meta.dtype])
    return layout, np.frombuffer(buf, np.uint8).reshape(meta.shape[0], meta.shape[1], layout.row)


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
        """A write whose KV is in tensors (in-process callers; the store's own socket: `serve`)."""
        (lk, kb), (lv, vb) = tensor_bytes(k), tensor_bytes(v)
        self.write_bytes(owner, msg, (lk, lv), kb, vb)

    def write_bytes(self, owner: str, msg: P.KVWrite, layout: tuple[Layout, Layout], kb: np.ndarray, vb: np.ndarray) -> None:
        """Append each request's positions (k and v as bytes [layers, n, row]) to its checkpoint.
        The layout is read once per write (every request in it shares it); per request, one copy
        of k and one of v, into its last chunk unless it must grow."""
        last = self.last_seq.get(owner)
        if last is not None and msg.seq > last + 1:
            self.gaps += msg.seq - last - 1
        self.last_seq[owner] = msg.seq
        offset = 0
        for req_id, start, n in zip(msg.req_ids, msg.starts, msg.counts):
            offset += n
            cp = self.requests.get(req_id)
            if cp is not None and cp.owner != owner and not self.owned_by(cp, owner):
                self.foreign += 1
                continue
            if cp is None or start == 0:  # new, or recomputed from scratch after a preemption
                if cp is not None:
                    self.drop(req_id)
                cp = self.requests[req_id] = Checkpoint(owner, layout)
            if start < cp.committed:  # recomputed from `start` (a preemption): the rest is stale
                self._truncate(cp, start)
            end = start + n
            if cp.frozen or cp.layout != layout or start > cp.committed:
                self._freeze(cp)  # a hole or a misfit: restorable up to its committed prefix
            elif n == 1 and cp.base <= start < cp.capacity:  # a decode step: into the last chunk
                cp.kb[:, start - cp.base] = kb[:, offset - 1]  # out of the network buffer
                cp.vb[:, start - cp.base] = vb[:, offset - 1]
                cp.committed = end
            elif n and not self._append(cp, start, kb[:, offset - n:offset], vb[:, offset - n:offset]):
                self._freeze(cp)  # over budget
        for req_id in msg.finished:
            if self.owned_by(self.requests.get(req_id, Checkpoint(owner, layout)), owner):
                self.drop(req_id)
            else:
                self.foreign += 1

    def _append(self, cp: Checkpoint, start: int, kb: np.ndarray, vb: np.ndarray) -> bool:
        """Positions from `start` (as bytes [layers, n, row]) into the chunks that hold them, past
        the last one into a new chunk; False (nothing written) if that does not fit the budget."""
        end = start + kb.shape[1]
        if end > cp.capacity and not self._grow(cp, end - cp.capacity):
            return False
        i = len(cp.chunks) - 1
        while cp.chunks[i].base > start:
            i -= 1
        pos = start
        while pos < end:
            chunk = cp.chunks[i]
            m = min(end, chunk.base + chunk.kb.shape[1]) - pos
            chunk.kb[:, pos - chunk.base:pos - chunk.base + m] = kb[:, pos - start:pos - start + m]
            chunk.vb[:, pos - chunk.base:pos - chunk.base + m] = vb[:, pos - start:pos - start + m]
            pos, i = pos + m, i + 1
        cp.committed = end
        return True

    def _grow(self, cp: Checkpoint, need: int) -> bool:
        """A new chunk for `need` more positions: just those for the first (a prompt is written
        whole), CHUNK at least for the next ones, unless that would not fit the budget; False
        (nothing changes) if `need` does not."""
        k, v = cp.layout
        per_position = k.layers * k.row + v.layers * v.row
        for size in (max(need, CHUNK) if cp.chunks else need, need):
            if self.bytes + size * per_position <= self.max_bytes:
                cp.push(Chunk.new(cp.layout, cp.capacity, size))
                self.bytes += size * per_position
                return True
        return False

    def _truncate(self, cp: Checkpoint, length: int) -> None:
        """Positions from `length` on are stale: chunks that hold only those are given back."""
        while cp.chunks and cp.base >= length:
            chunk = cp.pop()
            self.bytes -= chunk.nbytes
        cp.committed = length

    def _freeze(self, cp: Checkpoint) -> None:
        """No more writes until it is recomputed from scratch: its room to grow is given back."""
        if not cp.frozen and cp.capacity > cp.committed:
            last = cp.pop()
            self.bytes -= last.nbytes
            if (used := cp.committed - last.base) > 0:
                chunk = Chunk.new(cp.layout, last.base, used)
                chunk.kb[:], chunk.vb[:] = last.kb[:, :used], last.vb[:, :used]
                cp.push(chunk)
                self.bytes += chunk.nbytes
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
        if not self.parked:
            return []

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
        """The committed prefix, in one new tensor each (it is sent without a copy)."""
        cp = self.requests.get(req_id)
        if cp is None or cp.committed == 0:
            return 0, None, None
        n = cp.committed
        parts = [c for c in cp.chunks if c.base < n]
        k, v = cp.layout
        return n, k.tensor([c.kb[:, :n - c.base] for c in parts]), v.tensor([c.vb[:, :n - c.base] for c in parts])

    def stats(self) -> dict[str, int]:
        return {"bytes": self.bytes, "max_bytes": self.max_bytes, "requests": len(self.requests),
                "positions": sum(cp.committed for cp in self.requests.values()),
                "refused": self.refused, "gaps": self.gaps, "foreign": self.foreign}


def run(spec: WorkerSpec, ctx: Context, orch: OrchestratorChannel) -> None:
    keep_freed_memory(HEAP_KEEP_BYTES)  # less than a compute worker's: checkpoints come and go by the GB
    store = CheckpointStore(spec.store_max_bytes)
    sock = make_socket(ctx, zmq.ROUTER, bind=spec.endpoint, max_bytes=DATA_MAX_BYTES)
    loaded(spec)
    orch.send(P.Ready(spec.name, Role.STORE, os.getpid(), store.stats()))
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
        if sock in events:
            take_messages(store, sock, spec.name)
        for requester, req_id, allowed in store.due_restores(time.monotonic()):
            answer_restore(store, sock, requester, req_id, allowed)
        if time.monotonic() >= next_stats:  # byte accounting, for /metrics and llm.workers()
            orch.send(P.Ready(spec.name, Role.STORE, os.getpid(), store.stats()))
            next_stats = time.monotonic() + 0.5


def take_messages(store: CheckpointStore, sock: zmq.Socket, name: str) -> None:
    """The next message; while a restore waits, every one already here (up to 1000), so that each
    write that arrived before it is in when it is answered. (Otherwise one: the poll that follows
    finds the next, and finding the queue empty would cost a store as much CPU as a write.)"""
    for _ in range(1000):
        try:
            got = recv(sock, FROM_ATTENTION, name, flags=zmq.NOBLOCK, check=check_write, tensors=False)
        except zmq.Again:
            return
        if got is not None:
            serve(store, got)
        if not store.parked:
            return


def check_write(got: Received) -> None:
    """Raises P.BadMessage unless a KVWrite's frames hold the positions it lists."""
    msg = got.msg
    if not isinstance(msg, P.KVWrite):
        return
    for meta, buf in zip((msg.k, msg.v), got.bufs):
        P.check_frame(meta, buf)
    k, v = msg.k.shape, msg.v.shape
    if len(k) != 4 or len(v) != 4 or k[:2] != v[:2] or k[1] != sum(msg.counts) or min(msg.counts, default=0) < 0 \
            or not len(msg.req_ids) == len(msg.starts) == len(msg.counts) or min(msg.starts, default=0) < 0:
        raise P.BadMessage(f"KV of shape {k} for {sum(msg.counts)} positions")


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
    (lk, kb), (lv, vb) = frame_bytes(got.msg.k, got.bufs[0]), frame_bytes(got.msg.v, got.bufs[1])
    store.write_bytes(got.sender, got.msg, (lk, lv), kb, vb)


def answer_restore(store: CheckpointStore, sock: zmq.Socket, requester: bytes, req_id: str, allowed: bool) -> None:
    """Send a request's committed KV, or nothing (committed 0) to a worker that does not own it."""
    committed, k, v = store.restore(req_id) if allowed else (0, None, None)
    k = k if k is not None else torch.empty(0)
    v = v if v is not None else torch.empty(0)
    header = P.RestoreData(req_id, committed, P.tensor_meta(k), P.tensor_meta(v))
    sock.send_multipart([requester, *P.encode(header, k, v)], copy=False)

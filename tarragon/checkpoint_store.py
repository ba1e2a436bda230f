"""The checkpoint store: its own process (another host in production), holding every attention
worker's KV cache as it grows, so a dead worker's requests resume elsewhere from their last
committed token instead of being re-prefilled.

Writes arrive as each step's new KV (all layers at once, so arrival commits them); per request
the store keeps the contiguous prefix it has, `committed` tokens long. A write that would leave a
hole (an earlier write was dropped under back-pressure, or this store replaced a dead one) or
that does not fit the byte budget freezes the request at its committed prefix: it stays
restorable up to there, the rest is recomputed. Finished requests are dropped. Memory never
grows past `store_max_bytes`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
import zmq

from . import protocol as P

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    owner: str
    # Views [layers, n, heads, dim] into whole writes: a write is copied once, not per request.
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

    def write(self, owner: str, msg: P.KVWrite, k: torch.Tensor, v: torch.Tensor) -> None:
        last = self.last_seq.get(owner)
        if last is not None and msg.seq > last + 1:
            self.gaps += msg.seq - last - 1
        self.last_seq[owner] = msg.seq
        if self.bytes + k.nbytes + v.nbytes <= self.max_bytes:
            k, v = k.clone(), v.clone()  # out of the network buffer, once for the whole write
        offset = 0
        for req_id, start, n in zip(msg.req_ids, msg.starts, msg.counts):
            kc, vc = k[:, offset : offset + n], v[:, offset : offset + n]
            offset += n
            cp = self.requests.get(req_id)
            if cp is None or start == 0:  # new, or recomputed from scratch after a preemption
                if cp is not None:
                    self.drop(req_id)
                cp = self.requests[req_id] = Checkpoint(owner)
            cp.owner = owner
            if start < cp.committed:
                self._truncate(cp, start)
            if cp.frozen or start > cp.committed or self.bytes + kc.nbytes + vc.nbytes > self.max_bytes:
                cp.frozen = True  # a hole, or over budget: restorable up to its committed prefix
                self.refused += 1
                continue
            cp.k.append(kc)
            cp.v.append(vc)
            cp.committed += n
            self.bytes += kc.nbytes + vc.nbytes
        for req_id in msg.finished:
            self.drop(req_id)

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
                "refused": self.refused, "gaps": self.gaps}


def run(spec, ctx: zmq.Context, orch: zmq.Socket) -> None:
    store = CheckpointStore(spec.store_max_bytes)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
    sock.bind(spec.endpoint)
    orch.send_multipart(P.encode(P.Ready(spec.name, "store", os.getpid(), store.stats())))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(orch, zmq.POLLIN)
    next_stats = 0.0
    while True:
        events = dict(poller.poll(timeout=500))
        if orch in events and isinstance(P.decode(orch.recv_multipart())[0], P.Shutdown):
            return
        if sock in events:
            frames = sock.recv_multipart(copy=False)
            ident = bytes(frames[0].buffer)
            try:
                msg, bufs = P.decode(frames[1:])
                if isinstance(msg, P.KVWrite) and len(bufs) == 2:
                    k, v = P.to_tensor(msg.k, bufs[0]), P.to_tensor(msg.v, bufs[1])
                    if k.shape[:2] != v.shape[:2] or k.dim() != 4 or v.dim() != 4 or k.shape[1] != sum(msg.counts) or min(msg.counts, default=0) < 0:
                        raise P.BadMessage(f"KV of shape {list(k.shape)} for {sum(msg.counts)} positions")
                    store.write(ident.decode(errors="replace"), msg, k, v)
                elif isinstance(msg, P.RestoreRequest):
                    committed, k, v = store.restore(msg.req_id)
                    k = k if k is not None else torch.empty(0)
                    v = v if v is not None else torch.empty(0)
                    sock.send_multipart([ident, *P.encode(P.RestoreData(msg.req_id, committed, P.tensor_meta(k), P.tensor_meta(v)), k, v)], copy=False)
                else:
                    raise P.BadMessage(f"unexpected {type(msg).__name__}")
            except P.BadMessage as e:
                log.warning("%s: dropped message: %s", spec.name, e)
        if time.monotonic() >= next_stats:  # byte accounting, for /metrics and llm.workers()
            orch.send_multipart(P.encode(P.Ready(spec.name, "store", os.getpid(), store.stats())))
            next_stats = time.monotonic() + 0.5

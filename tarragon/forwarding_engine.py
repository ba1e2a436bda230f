"""The attention worker's forwarding engine: ships routed tokens to expert workers.

One DEALER socket per expert worker: an independent point-to-point channel per AW-EW pair, no
collective group, so a dead peer breaks only its own channel. Every dispatch resolves logical
experts to physical workers through this worker's own routing table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import zmq

from . import protocol as P
from .model import MoECall
from .routing_table import RoutingTable

log = logging.getLogger(__name__)


@dataclass
class _Part:
    call_id: int
    worker: str
    rows: int


class ExpertFuture:
    """The combined expert output of one MoE call, once every worker has answered."""

    def __init__(self, engine: "ForwardingEngine", parts: list[_Part], token_of_row: torch.Tensor, row_weights: torch.Tensor, like: torch.Tensor):
        self.engine, self.parts = engine, parts
        self.token_of_row, self.row_weights, self.like = token_of_row, row_weights, like

    def result(self) -> torch.Tensor:
        outs = [self.engine.wait(p) for p in self.parts]
        rows = outs[0] if len(outs) == 1 else torch.cat(outs)
        combined = torch.zeros_like(self.like)
        combined.index_add_(0, self.token_of_row, (rows * self.row_weights[:, None]).to(combined.dtype))
        return combined


class ForwardingEngine:
    def __init__(self, name: str, table: RoutingTable, endpoints: dict[str, str], ctx: zmq.Context, reply_timeout_s: float = 60.0):
        self.name = name
        self.table = table
        self.failed: frozenset[str] = frozenset()
        self.reply_timeout_s = reply_timeout_s
        self.sockets: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        for worker, endpoint in endpoints.items():
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, name.encode())
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
            s.connect(endpoint)
            self.sockets[worker] = s
            self.poller.register(s, zmq.POLLIN)
        self.rank = {w: i for i, w in enumerate(self.sockets)}
        self.expected: dict[int, _Part] = {}
        self.replies: dict[int, torch.Tensor] = {}
        self.next_id = 0
        self._owner_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _owners(self, layer: int) -> tuple[list[str], torch.Tensor]:
        names = self.table.resolve(layer, self.failed)
        key = (self.table.version, layer)
        if key not in self._owner_cache:
            self._owner_cache[key] = torch.tensor([self.rank[w] for w in names], dtype=torch.long)
        return names, self._owner_cache[key]

    def dispatch(self, call: MoECall) -> ExpertFuture:
        """Send each expert worker its rows: one message per worker, rows grouped by expert."""
        T, k = call.expert_ids.shape
        E = self.table.num_experts
        flat = call.expert_ids.reshape(-1)
        names, owner_rank = self._owners(call.layer)
        order = torch.argsort(owner_rank[flat] * E + flat, stable=True)  # by worker, then expert
        sorted_experts = flat[order]
        token_of_row = order // k
        rows = call.hidden[token_of_row]
        counts = torch.bincount(flat, minlength=E).tolist()
        parts: list[_Part] = []
        offset = 0
        for worker in sorted({names[e] for e in range(E) if counts[e]}, key=self.rank.__getitem__):
            experts = [e for e in range(E) if counts[e] and names[e] == worker]
            n = sum(counts[e] for e in experts)
            part = _Part(self.next_id, worker, n)
            self.next_id += 1
            hidden = rows[offset : offset + n]
            header = P.ExpertRequest(part.call_id, call.layer, experts, [counts[e] for e in experts], P.tensor_meta(hidden))
            self.sockets[worker].send_multipart(P.encode(header, hidden), copy=False)
            self.expected[part.call_id] = part
            parts.append(part)
            offset += n
        return ExpertFuture(self, parts, token_of_row, call.weights.reshape(-1)[order], call.hidden)

    def wait(self, part: _Part) -> torch.Tensor:
        deadline = time.monotonic() + self.reply_timeout_s
        while part.call_id not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: expert worker {part.worker} silent for {self.reply_timeout_s:.0f}s")
            for sock, _ in self.poller.poll(timeout=left * 1000):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._accept(frames)
        return self.replies.pop(part.call_id)

    def _accept(self, frames) -> None:
        try:
            header, bufs = P.decode(frames)
            if not isinstance(header, P.ExpertReply) or len(bufs) != 1:
                raise P.BadMessage(f"unexpected {type(header).__name__} on the datapath")
            part = self.expected.pop(header.call_id, None)
            if part is None:
                raise P.BadMessage(f"reply to unknown or finished call {header.call_id}")
            hidden = P.to_tensor(header.hidden, bufs[0])
            if hidden.dim() != 2 or hidden.shape[0] != part.rows:
                self.expected[header.call_id] = part
                raise P.BadMessage(f"reply of shape {list(hidden.shape)} to a call of {part.rows} rows")
        except P.BadMessage as e:
            log.warning("%s: dropped message: %s", self.name, e)
            return
        self.replies[header.call_id] = hidden

    def close(self) -> None:
        for s in self.sockets.values():
            s.close(0)

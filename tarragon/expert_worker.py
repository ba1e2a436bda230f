"""Expert worker (EW): stateless server of routed experts.

It listens on one endpoint, and each attention worker connects to it, so every AW-EW pair is its
own connection: a local link on this host (ipc://, see local_link.py), or a ZMQ ROUTER socket
that each AW's DEALER connects to over tcp:// (from other hosts). Each pass drains every request
that has arrived (from all AWs, all micro-batches), batches the rows per (layer, expert) across
them, runs each expert once, and answers every request.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
import zmq

from . import local_link
from . import protocol as P
from .config import ModelConfig
from .local_link import SPIN_S, poll_spinning
from .model import ExpertBank
from .procfs import CpuDemand
from .sockets import DATA_MAX_BYTES, Context, Received, make_socket, recv
from .vocabulary import Role
from .weights import WeightFiles, torch_dtype
from .worker import OrchestratorChannel, WorkerSpec, loaded

MAX_DRAIN = 256  # requests read from the ROUTER per pass at most
log = logging.getLogger(__name__)


def serve_batch(bank: ExpertBank, requests: list[tuple[bytes, P.ExpertRequest, torch.Tensor]]):
    """Run the experts over all requests' rows; returns (identity, reply header, output) triples.
    Rows of one layer, from every request, go through the bank in one call, grouped by expert
    (one pass over each expert's weights). Rows arrive and leave in host memory; they are
    computed where the bank is."""
    if len(requests) == 1:  # (most calls: a request's rows are already grouped by expert, in order)
        ident, req, x = requests[0]
        y = P.to_host(bank.run_layer(req.layer, req.experts, req.counts, P.to_device(x, bank.device)))
        return [(ident, P.ExpertReply(req.call_id, P.tensor_meta(y)), y)]
    inputs = [P.to_device(x, bank.device) for _, _, x in requests]
    outputs = [torch.empty_like(x) for x in inputs]
    work: dict[int, dict[int, list[tuple[int, int, int]]]] = defaultdict(lambda: defaultdict(list))  # layer -> expert -> pieces
    for r, (_, req, _) in enumerate(requests):
        start = 0
        for e, n in zip(req.experts, req.counts):
            work[req.layer][e].append((r, start, n))
            start += n
    for layer, by_expert in work.items():
        experts = sorted(by_expert)
        pieces = [p for e in experts for p in by_expert[e]]
        x = torch.cat([inputs[r][s : s + n] for r, s, n in pieces]) if len(pieces) > 1 else inputs[pieces[0][0]]
        y = bank.run_layer(layer, experts, [sum(n for _, _, n in by_expert[e]) for e in experts], x)
        offset = 0
        for r, s, n in pieces:
            outputs[r][s : s + n] = y[offset : offset + n]
            offset += n
    outputs = [P.to_host(out) for out in outputs]
    return [(ident, P.ExpertReply(req.call_id, P.tensor_meta(out)), out) for (ident, req, _), out in zip(requests, outputs)]


def check_request(bank: ExpertBank, hidden_size: int, got: Received) -> None:
    """Raises P.BadMessage unless the request's rows are for experts served here, in their shape."""
    header, x = got.msg, got.tensors[0]
    if len(header.experts) != len(header.counts) or any(n < 0 for n in header.counts):
        raise P.BadMessage("experts and counts disagree")
    if x.dim() != 2 or x.shape[1] != hidden_size or x.shape[0] != sum(header.counts):
        raise P.BadMessage(f"hidden of shape {list(x.shape)} for {sum(header.counts)} rows")
    if x.dtype != bank.dtype:
        raise P.BadMessage(f"hidden of dtype {x.dtype}, expected {bank.dtype}")
    missing = [e for e in header.experts if (header.layer, e) not in bank]
    if missing:
        raise P.BadMessage(f"experts {missing} of layer {header.layer} are not served here")


def load(spec: WorkerSpec, cfg: ModelConfig) -> ExpertBank:
    """The experts of `spec`, each run once (page faults, BLAS set-up) before serving."""
    with WeightFiles(spec.model_dir) as files:
        bank = ExpertBank(cfg, files, [tuple(x) for x in spec.experts], torch_dtype(spec.dtype), spec.device)
    with torch.inference_mode():
        for key in bank.keys():
            bank.run(*key, torch.zeros(2, cfg.hidden_size, dtype=bank.dtype, device=bank.device))
    return bank


class RouterEnd:
    """The datapath end over ZeroMQ, for attention workers on other hosts (tcp://): a ROUTER
    socket. The same calls as local_link.Listener."""

    def __init__(self, ctx: Context, endpoint: str, poller: zmq.Poller, where: str):
        self.sock = make_socket(ctx, zmq.ROUTER, bind=endpoint, max_bytes=DATA_MAX_BYTES)
        self.where = where
        poller.register(self.sock, zmq.POLLIN)

    def receive(self, events: dict, accept: tuple[type, ...], check: Callable[[Received], None]) -> list[Received]:
        """Every valid message already here (at most MAX_DRAIN)."""
        got = []
        while self.sock in events and len(got) < MAX_DRAIN and self.sock.get(zmq.EVENTS) & local_link.POLLIN:  # (cheaper than reading until zmq.Again)
            if (m := recv(self.sock, accept, self.where, zmq.NOBLOCK, check=check)) is not None:
                got.append(m)
        return got

    def send(self, identity: bytes, frames: list) -> None:
        self.sock.send_multipart([identity, *frames], copy=False)


def unfenced(requests: list[tuple[bytes, P.ExpertRequest, torch.Tensor]], fenced: set[bytes], refused: set[bytes]) -> list:
    """The requests not sent by a fenced attention worker (it computes nothing more here)."""
    for ident in {r[0] for r in requests if r[0] in fenced} - refused:
        refused.add(ident)
        log.warning("dropping calls from %s: fenced (declared failed)", ident.decode(errors="replace"))
    return [r for r in requests if r[0] not in fenced]


def run(spec: WorkerSpec, ctx: Context, orch: OrchestratorChannel) -> None:
    """The main loop: drain requests, batch, compute (replays first), reply; obey the orchestrator."""
    cfg = ModelConfig.from_dir(spec.model_dir)
    bank = load(spec, cfg)
    shadow = {tuple(x) for x in spec.shadow_experts}
    shadow_bytes = sum(bank.expert_nbytes(k) for k in bank.keys() if k in shadow)
    poller = zmq.Poller()
    poller.register(orch.sock, zmq.POLLIN)
    end = (local_link.Listener if local_link.is_local(spec.endpoint) else partial(RouterEnd, ctx))(spec.endpoint, poller, spec.name)
    info = {"expert_bytes": bank.nbytes, "shadow_bytes": shadow_bytes, "experts": len(bank.keys()), "shadows": len(shadow)}
    loaded(spec)
    orch.send(P.Ready(spec.name, Role.EXPERT, os.getpid(), info))
    check = partial(check_request, bank, cfg.hidden_size)
    fenced: set[bytes] = set()  # attention workers declared failed: a partitioned one may still ask
    refused: set[bytes] = set()  # ... and asked: logged once each
    cpu, linger = CpuDemand(), False
    with torch.inference_mode():
        while True:
            # After a batch whose sender calls again at once (ExpertRequest.linger), poll for that
            # call before sleeping, while no task waits for a CPU: +5 % tok/s at 1-2 requests.
            spin = SPIN_S if linger and cpu.spare() else 0.0
            events = dict(poll_spinning(poller, time.perf_counter() + spin, None))
            got = recv(orch.sock, (P.Shutdown, P.Fence), spec.name) if orch.sock in events else None
            if got is not None and isinstance(got.msg, P.Shutdown):
                return
            if got is not None:
                fenced = {w.encode() for w in got.msg.workers}
            requests = [(m.identity, m.msg, m.tensors[0]) for m in end.receive(events, (P.ExpertRequest,), check)]
            if fenced:
                requests = unfenced(requests, fenced, refused)
            if requests:
                linger = all(r[1].linger for r in requests)
            replays = [r for r in requests if r[1].replay]
            for batch in (replays, [r for r in requests if not r[1].replay]) if replays else (requests,):
                if batch:
                    for ident, header, out in serve_batch(bank, batch):
                        end.send(ident, P.encode(header, out))

"""Attention worker (AW): the stateful half of the model.

It owns a disjoint set of requests: their KV cache, their scheduling, their sampling. Each step it
runs attention for every scheduled token and sends routed tokens to the expert workers through
its forwarding engine. Requests arrive from, and tokens go back to, the driver. Each step's new
KV leaves for the checkpoint store without blocking (ZMQ's I/O thread sends it; a full queue drops
the write and the store keeps the committed prefix). Requests of a failed AW arrive here as
resumptions: their KV is fetched from the store and installed beside the running requests. When
the store is replaced (its successor takes over its address, so the channel reconnects), every
running request's whole KV is written again: the new store holds committed KV at once, and a
later failure of this worker still restores instead of recomputing.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from .config import ModelConfig
from .forwarding_engine import ForwardingEngine, ShutdownRequested
from .kv_cache import KVCache
from .model import AttentionModel
from .model_runner import Flight, ModelRunner, StepOutput
from .scheduler import ScheduledChunk, Scheduler, Sequence
from .sockets import DATA_MAX_BYTES, drops, make_socket, recv
from .weights import WeightFiles, torch_dtype
from .worker import restore_priority

log = logging.getLogger(__name__)


FROM_DRIVER = (P.AddRequest, P.ResumeRequest, P.AbortRequest)


class AttentionWorker:
    def __init__(self, spec, ctx: zmq.Context, orch: zmq.Socket):
        self.spec, self.orch = spec, orch
        cfg = ModelConfig.from_dir(spec.model_dir)
        dtype = torch_dtype(spec.dtype)
        with WeightFiles(spec.model_dir) as files:
            model = AttentionModel(cfg, files, dtype, spec.device)
        e = self.engine_cfg = spec.engine
        self.kv = KVCache(cfg, e.kv_cache_blocks, e.block_size, dtype, spec.device)
        self.sched = Scheduler(self.kv, e.max_num_seqs, e.max_num_batched_tokens, e.max_model_len, cfg.eos_token_ids, e.micro_batches)
        self.engine = ForwardingEngine(spec.name, spec.table, spec.expert_endpoints, ctx, orch, spec.probe_endpoints_of_experts,
                                       spec.probe_interval_s, spec.probe_timeout_s)
        self.runner = ModelRunner(model, self.kv, self.engine)
        self.flights: dict[int, Flight] = {}  # micro-batch group -> its step in the air
        self.driver = self._socket(ctx, spec.driver_endpoint)
        self.store = self.store_events = None
        if spec.store_endpoint:
            self.store = make_socket(ctx, zmq.DEALER, connect=spec.store_endpoint, identity=spec.name, max_bytes=DATA_MAX_BYTES,
                                     monitor=zmq.EVENT_CONNECTED)
            self.store_events = self.store.get_monitor_socket(zmq.EVENT_CONNECTED)  # a new store: refill it
            self.store.setsockopt(zmq.SNDHWM, e.checkpoint_queue)
        self.store_connects = 0
        self.poller = zmq.Poller()
        for s in (self.driver, orch, self.store):
            if s is not None:
                self.poller.register(s, zmq.POLLIN)
        self.write_seq = 0
        self.finished: list[str] = []  # to tell the store with the next write
        self.restoring: dict[str, tuple[Sequence, float]] = {}
        self.partial_logits: dict[str, list[torch.Tensor]] = {}

    def _socket(self, ctx: zmq.Context, endpoint: str) -> zmq.Socket:
        return make_socket(ctx, zmq.DEALER, connect=endpoint, identity=self.spec.name, max_bytes=DATA_MAX_BYTES)

    def run(self) -> None:
        ready = P.Ready(self.spec.name, "attention", os.getpid(), {"kv_blocks": self.kv.num_blocks})
        self.driver.send_multipart(P.encode(ready))
        self.orch.send_multipart(P.encode(ready))
        restore_priority(self.spec)
        while True:
            if not self.flights and not self.sched.has_work():
                self.poller.poll(100 if self.restoring else None)  # idle: sleep until a message
            self.engine.service_control()
            self.handle_driver()
            self.handle_store()
            for group in range(self.sched.groups):  # advance each group's step; start the next at once
                flight = self.flights.get(group)
                if flight is not None and (out := self.runner.advance(flight)) is not None:
                    del self.flights[group]
                    self.sched.in_flight.discard(group)
                    self.finish_step(flight.chunks, out)
                if group not in self.flights and (chunks := self.sched.schedule(group)):
                    self.flights[group] = self.runner.launch(chunks)
                    self.sched.in_flight.add(group)

    def finish_step(self, chunks: list[ScheduledChunk], out: StepOutput) -> None:
        """A step's tokens: to the scheduler, the checkpoint store and the driver."""
        for c in chunks:  # prompt logits go out once the whole prompt is computed
            if c.seq.req_id in out.prompt_logits:
                self.partial_logits.setdefault(c.seq.req_id, []).append(out.prompt_logits[c.seq.req_id])
                if c.start + c.count >= len(c.seq.prompt):
                    logits = torch.cat(self.partial_logits.pop(c.seq.req_id))
                    self.driver.send_multipart(P.encode(P.PromptLogits(c.seq.req_id, P.tensor_meta(logits)), logits), copy=False)
                    c.seq.params.prompt_logits = False  # not again after a preemption
        got = self.sched.update(chunks, out.sampled)
        self.checkpoint(chunks, out.slots, [s.req_id for s in got if s.finish_reason])
        self.driver.send_multipart(P.encode(P.Tokens(
            req_ids=[s.req_id for s in got], tokens=[s.output[-1] for s in got], finish=[s.finish_reason or "" for s in got],
            kv_used=self.kv.used, running=len(self.sched.running), waiting=len(self.sched.waiting), replayed=self.engine.replayed,
            logprobs=out.logprobs if any(lp is not None for lp in out.logprobs) else [],
        )))

    def checkpoint(self, chunks: list[ScheduledChunk], slots: torch.Tensor, finished: list[str]) -> None:
        """Queue this step's new KV for the store; never blocks (a full queue drops the write)."""
        if self.store is None:  # checkpointing off: nothing to write, nothing to collect
            return
        self.finished += finished
        k, v = self.kv.k.index_select(1, slots), self.kv.v.index_select(1, slots)
        msg = P.KVWrite(self.write_seq, [c.seq.req_id for c in chunks], [c.start for c in chunks], [c.count for c in chunks],
                        P.tensor_meta(k), P.tensor_meta(v), self.finished)
        if self.send_to_store(msg, k, v):
            self.finished = []
        if self.store_events.poll(0):  # the channel (re)connected: a store that may know nothing
            recv_monitor_message(self.store_events)
            self.store_connects += 1
            if self.store_connects > 1:
                self.refill_store()

    def send_to_store(self, msg: P.KVWrite, k: torch.Tensor, v: torch.Tensor) -> bool:
        self.write_seq += 1
        try:
            self.store.send_multipart(P.encode(msg, k, v), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False  # the store is slow or gone: inference goes on, those requests' checkpoints stop

    def refill_store(self) -> None:
        """Write every running request's KV from position 0: a replacement store starts empty."""
        seqs = [s for s in self.sched.running if s.num_computed > 0]
        if not seqs:
            return
        slots = torch.cat([self.kv.slots(s.blocks, 0, s.num_computed) for s in seqs]).to(self.kv.k.device)
        k, v = self.kv.k.index_select(1, slots), self.kv.v.index_select(1, slots)
        msg = P.KVWrite(self.write_seq, [s.req_id for s in seqs], [0] * len(seqs), [s.num_computed for s in seqs],
                        P.tensor_meta(k), P.tensor_meta(v), [])
        sent = self.send_to_store(msg, k, v)
        self.report("store_refilled" if sent else "store_refill_dropped",
                    f"{len(seqs)} requests, {len(slots)} positions", 0.0)

    def handle_driver(self) -> None:
        while self.driver.poll(0):
            got = recv(self.driver, FROM_DRIVER, f"{self.spec.name} (driver)")
            msg = got.msg if got else None
            if isinstance(msg, P.AddRequest):
                self.sched.add(Sequence(msg.req_id, list(msg.prompt), msg.params))
            elif isinstance(msg, P.ResumeRequest):
                seq = Sequence(msg.req_id, list(msg.prompt), msg.params, output=list(msg.output), max_chunk=1 if msg.tokenwise else None)
                if msg.restore and self.store is not None:
                    self.restoring[msg.req_id] = (seq, time.monotonic())
                    self.store.send_multipart(P.encode(P.RestoreRequest(msg.req_id)))
                else:
                    self.sched.add(seq, front=True)  # recompute: prefill prompt + output
            elif isinstance(msg, P.AbortRequest):
                for req_id in msg.req_ids:
                    self.sched.abort(req_id)
                    if self.store is not None:
                        self.finished.append(req_id)

    def handle_store(self) -> None:
        """Install restored KV; requests whose restore is overdue are recomputed instead."""
        while self.store is not None and self.store.poll(0):
            got = recv(self.store, (P.RestoreData,), f"{self.spec.name} (store)")
            if got is None:
                continue
            msg, bufs, entry = got.msg, got.bufs, None
            try:
                entry = self.restoring.pop(msg.req_id, None)
                if entry is not None:
                    self.install(entry[0], msg, P.to_tensor(msg.k, bufs[0]), P.to_tensor(msg.v, bufs[1]), entry[1])
            except P.BadMessage as e:
                drops.note(f"{self.spec.name} (store)", "store", str(e))
                if entry is not None:  # its restore failed: recompute it
                    self.sched.add(entry[0], front=True)
        now = time.monotonic()
        for req_id, (seq, t0) in list(self.restoring.items()):
            if now - t0 > self.engine_cfg.restore_timeout_s:
                del self.restoring[req_id]
                self.report("restore_timeout", f"{req_id}: store silent, recomputing", (now - t0) * 1000)
                self.sched.add(seq, front=True)

    def install(self, seq: Sequence, msg: P.RestoreData, k: torch.Tensor, v: torch.Tensor, t0: float) -> None:
        """Install restored KV, once it is checked against this model; a checkpoint that does not
        fit is dropped and the request recomputed (its first write replaces it at the store)."""
        # Keep at least the last known token to compute: its logits give the next token.
        n = min(msg.committed, seq.length - 1)
        misfit = self.misfit(k, v, n) if n > 0 else None
        if misfit:
            log.warning("%s: checkpoint of %s rejected: %s", self.spec.name, seq.req_id, misfit)
            self.report("restore_rejected", f"{seq.req_id}: {misfit}; recomputing", (time.monotonic() - t0) * 1000)
        elif n > 0 and self.kv.grow(seq.blocks, n):
            try:
                device = self.kv.k.device
                slots = self.kv.slots(seq.blocks, 0, n).to(device)
                self.kv.k.index_copy_(1, slots, P.to_device(k[:, :n], device))
                self.kv.v.index_copy_(1, slots, P.to_device(v[:, :n], device))
                seq.num_computed = n
            except (RuntimeError, ValueError) as e:  # never let a checkpoint take the worker down
                log.warning("%s: installing %s failed (%s): recomputing", self.spec.name, seq.req_id, e)
                self.kv.release(seq.blocks)
        self.sched.add(seq, front=True)
        self.report("restored", f"{seq.req_id}: {seq.num_computed} of {seq.length} tokens from the store", (time.monotonic() - t0) * 1000)

    def misfit(self, k: torch.Tensor, v: torch.Tensor, n: int) -> str | None:
        """Why restored KV does not fit this model's cache (layers, positions, heads, dims, dtype), or
        None. k and v are checked against their own caches: under MLA they differ in shape."""
        for name, got, want in (("k", k, self.kv.k), ("v", v, self.kv.v)):
            if got.dim() != 4 or got.shape[0] != want.shape[0] or got.shape[2:] != want.shape[2:] or got.shape[1] < n:
                return f"{name} of shape {list(got.shape)}, this model needs [{want.shape[0]}, >={n}, {want.shape[2]}, {want.shape[3]}]"
            if got.dtype != want.dtype:
                return f"{name} in {got.dtype}, this model's cache is {want.dtype}"
        return None

    def report(self, kind: str, detail: str, ms: float) -> None:
        self.orch.send_multipart(P.encode(P.Report(kind, self.spec.name, detail, ms)))


def run(spec, ctx: zmq.Context, orch: zmq.Socket) -> None:
    try:
        AttentionWorker(spec, ctx, orch).run()
    except ShutdownRequested:
        return

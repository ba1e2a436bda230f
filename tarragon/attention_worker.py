"""Attention worker (AW): the stateful half of the model.

It owns a disjoint set of requests: their KV cache, their scheduling, their sampling. Each step it
runs attention for every scheduled token and sends routed tokens to the expert workers through
its forwarding engine. Requests arrive from, and tokens go back to, the driver. Each step's new
KV leaves for the checkpoint stores without blocking (see checkpointer). Requests of a failed AW
arrive here as resumptions: their KV is fetched from the stores and installed beside the running
requests.

A planned drain (the orchestrator's `Drain`): it lets the steps in flight finish (their tokens go
to the driver, their KV to the stores), launches no more, makes sure every store has every write
(one round trip on each channel), then hands every request back to the driver (`Drained`),
which moves them to another worker: they resume from the stores, nothing is recomputed. It stays
up, bouncing any request that still reaches it, until the orchestrator shuts it down.

Its channel to the orchestrator is its own (`on_control`): routing tables go to the forwarding
engine, a drain and a shutdown set flags its loop checks. While a step waits for experts the engine
wakes on that channel too and calls `on_control`, which stops the wait on a shutdown.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq

from . import paged_attention
from . import protocol as P
from .checkpointer import Checkpointer, Restore
from .config import ModelConfig
from .forwarding_engine import ForwardingEngine
from .kv_cache import KVCache
from .model import AttentionModel
from .model_runner import Flight, ModelRunner, StepOutput
from .scheduler import ScheduledChunk, Scheduler, Sequence
from .sockets import DATA_MAX_BYTES, Context, make_socket, recv
from .vocabulary import EventKind, Role
from .weights import WeightFiles, torch_dtype
from .worker import OrchestratorChannel, WorkerSpec, loaded

log = logging.getLogger(__name__)


FROM_DRIVER = (P.AddRequest, P.ResumeRequest, P.AbortRequest)
FEW_SEQUENCES = 8  # a packed batch this small goes to one expert worker (see step)
FROM_ORCHESTRATOR = (P.TableUpdate, P.Drain, P.Shutdown)


class AttentionWorker:
    def __init__(self, spec: WorkerSpec, ctx: Context, orch: OrchestratorChannel):
        self.spec, self.orch = spec, orch
        cfg = ModelConfig.from_dir(spec.model_dir)
        dtype = torch_dtype(spec.dtype)
        with WeightFiles(spec.model_dir) as files:
            model = AttentionModel(cfg, files, dtype, spec.device)
        paged_attention.available()  # built (the first time on a machine, ~0.3 s) and loaded before serving
        cache, sched, self.resilience = spec.config.cache, spec.config.scheduler, spec.config.resilience
        self.kv = KVCache(cfg, cache.kv_cache_blocks, cache.block_size, dtype, spec.device)
        self.sched = Scheduler(self.kv, sched.max_num_seqs, sched.max_num_batched_tokens, sched.max_model_len, cfg.eos_token_ids,
                               sched.micro_batches, sched.split_min)
        self.packed = spec.config.cluster.placement == "pack"
        self.head_threads = min(2, os.cpu_count() or 1) if self.packed else 1  # see step()
        self.engine = ForwardingEngine(spec.name, spec.table, spec.expert_endpoints, ctx, spec.probe_endpoints_of_experts,
                                       orch.send, spec.probe_interval_s, spec.probe_timeout_s)
        self.engine.wake_on(orch.sock, self.on_control)
        self.runner = ModelRunner(model, self.kv, self.engine)
        self.flights: dict[int, Flight] = {}  # micro-batch group -> its step in the air
        self.driver = self._socket(ctx, spec.driver_endpoint)
        self.ckpt = Checkpointer(ctx, spec.name, spec.store_endpoints, self.resilience.checkpoint_queue, self.kv, self.sched, self.report,
                                  self.resilience.checkpoint_interval_ms / 1000) if spec.store_endpoints else None
        self.poller = zmq.Poller()
        for s in (self.driver, orch.sock, *(self.ckpt.sockets() if self.ckpt else [])):
            self.poller.register(s, zmq.POLLIN)
        self.partial_logits: dict[str, list[torch.Tensor]] = {}
        self.drain_requested = False  # the orchestrator's Drain: no new steps, then hand every request back
        self.drained = False
        self.stopping = False  # the orchestrator's Shutdown: the loop ends

    def _socket(self, ctx: Context, endpoint: str) -> zmq.Socket:
        return make_socket(ctx, zmq.DEALER, connect=endpoint, identity=self.spec.name, max_bytes=DATA_MAX_BYTES)

    def run(self) -> None:
        """Until shut down: control messages, requests, restores, then each group's step."""
        loaded(self.spec)  # (before `Ready`: once announced, it is on the critical path)
        ready = P.Ready(self.spec.name, Role.ATTENTION, os.getpid(), {"kv_blocks": self.kv.num_blocks})
        self.driver.send_multipart(P.encode(ready))
        self.orch.send(ready)
        while not self.stopping:
            if not self.flights:
                self.between_steps()
            self.step()
            if not self.flights and not self.sched.has_work() and not self.stopping:
                if self.ckpt is not None:
                    self.ckpt.send_pending()  # the stores have everything before this sleeps
                self.poller.poll(100 if self.ckpt and self.ckpt.restoring else None)  # idle: sleep until a message

    def between_steps(self) -> None:
        """What arrived from the orchestrator, the driver and the stores; a drain once no step
        is in the air. Once per step (in the middle of one, the forwarding engine handles the
        orchestrator's messages): each socket checked costs a poll."""
        if not self.on_control():
            return
        self.handle_driver()
        self.handle_store()
        if self.drain_requested and not self.flights and not self.drained:
            self.drain()

    def step(self) -> None:
        """Advance each micro-batch group's step; start its next one at once."""
        # Packed, every expert goes to the first expert worker holding a live copy (shadows
        # included): with the batch split, so that this worker and that one each keep a core busy;
        # and for a batch of up to eight sequences, whose few rows would give each expert worker
        # one or two experts for a second message per layer: 1.1-1.3x the tokens/s at 1-2
        # requests. Such a batch goes from layer to layer within a few hundred microseconds: its
        # expert worker polls for the next call (`linger`) rather than sleep, which makes one
        # expert worker faster than two up to eight sequences (alternated in one cluster: +10-14 %
        # at 3-4, +5 % at 5-8; at 9-16 within the noise).
        # Not split, the expert workers wait while this one runs the LM head: on two threads.
        split = self.sched.split
        few = len(self.sched.running) <= FEW_SEQUENCES
        self.engine.prefer = min(self.engine.data, default=None) if self.packed and (split or few) else None
        self.engine.linger = self.packed and few and not split
        self.runner.head_threads = 1 if split else self.head_threads
        for group in range(self.sched.groups):
            flight = self.flights.get(group)
            if flight is not None and (out := self.runner.advance(flight)) is not None:
                del self.flights[group]
                self.sched.in_flight.discard(group)
                self.finish_step(flight.chunks, out)
                self.between_steps()
            if self.stopping:  # told to shut down while waiting for the experts
                return
            if group not in self.flights and not self.drain_requested and (chunks := self.sched.schedule(group)):
                self.flights[group] = self.runner.launch(chunks)
                self.sched.in_flight.add(group)

    def on_control(self) -> bool:
        """Apply what the orchestrator sent: routing tables, a drain, a shutdown. False once shut
        down (also called by the forwarding engine while it waits: False stops the wait)."""
        while not self.stopping and self.orch.sock.poll(0):
            got = recv(self.orch.sock, FROM_ORCHESTRATOR, f"{self.spec.name} (orchestrator)")
            msg = got.msg if got else None
            if isinstance(msg, P.TableUpdate):
                self.engine.apply_update(msg)
                if self.ckpt is not None and msg.store_endpoints:
                    for old, new in self.ckpt.retarget(msg.store_endpoints):
                        self.poller.unregister(old)
                        self.poller.register(new, zmq.POLLIN)
            elif isinstance(msg, P.Drain):
                self.drain_requested = True
            elif isinstance(msg, P.Shutdown):
                log.info("%s: told to shut down", self.spec.name)
                self.stopping = True
        return not self.stopping

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
        # Aborted while this step was in flight: its KV goes out with the step, then is dropped at once.
        self.checkpoint(chunks, out.slots, [s.req_id for s in got if s.finish_reason] + [c.seq.req_id for c in chunks if c.seq.aborted])
        self.driver.send_multipart(P.encode(P.Tokens(
            req_ids=[s.req_id for s in got], tokens=[s.output[-1] for s in got], finish=[s.finish_reason for s in got],
            kv_used=self.kv.used, running=len(self.sched.running), waiting=len(self.sched.waiting), replayed=self.engine.replayed,
            logprobs=out.logprobs if any(lp is not None for lp in out.logprobs) else [],
        )))

    def checkpoint(self, chunks: list[ScheduledChunk], slots: torch.Tensor, finished: list[str]) -> None:
        """Queue this step's new KV for the stores; never blocks."""
        if self.ckpt is not None:  # checkpointing off: nothing to write, nothing to collect
            self.ckpt.write([c.seq.req_id for c in chunks], [c.start for c in chunks], [c.count for c in chunks], slots, finished)

    def drain(self) -> None:
        """No step in flight: commit every write to the stores, then hand all requests back."""
        t0 = time.monotonic()
        self.drained = True
        flushed = self.ckpt.flush() if self.ckpt is not None else True
        restoring = [r.seq for r in self.ckpt.restoring.values()] if self.ckpt is not None else []
        seqs = list(self.sched.running) + list(self.sched.waiting) + restoring
        req_ids = list(dict.fromkeys(s.req_id for s in seqs))
        if self.ckpt is not None:
            self.ckpt.restoring.clear()
        for req_id in req_ids:
            self.sched.abort(req_id)  # frees the KV; the stores keep the checkpoints (not finished)
        self.driver.send_multipart(P.encode(P.Drained(self.spec.name, req_ids)))
        self.report(EventKind.DRAINED, f"{len(req_ids)} requests handed back" + ("" if flushed else "; stores not confirmed"),
                    (time.monotonic() - t0) * 1000)

    def handle_driver(self) -> None:
        while self.driver.poll(0):
            got = recv(self.driver, FROM_DRIVER, f"{self.spec.name} (driver)")
            msg = got.msg if got else None
            if self.drained and isinstance(msg, (P.AddRequest, P.ResumeRequest)):  # sent before the driver knew
                self.driver.send_multipart(P.encode(P.Drained(self.spec.name, [msg.req_id])))
            elif isinstance(msg, P.AddRequest):
                self.sched.add(Sequence(msg.req_id, list(msg.prompt), msg.params))
            elif isinstance(msg, P.ResumeRequest):
                seq = Sequence(msg.req_id, list(msg.prompt), msg.params, output=list(msg.output), max_chunk=1 if msg.tokenwise else None)
                if msg.restore and self.ckpt is not None:
                    self.ckpt.restore(seq)
                else:
                    self.sched.add(seq, front=True)  # recompute: prefill prompt + output
            elif isinstance(msg, P.AbortRequest):
                for req_id in msg.req_ids:
                    self.sched.abort(req_id)
                if self.ckpt is not None:
                    self.ckpt.forget(msg.req_ids)

    def handle_store(self) -> None:
        """Install restored KV (the longest prefix the stores have); none: recompute."""
        if self.ckpt is None:
            return
        for r in self.ckpt.receive(self.resilience.restore_timeout_s):
            if r.best is None:
                self.sched.add(r.seq, front=True)
                self.report(EventKind.RESTORED, f"{r.seq.req_id}: 0 of {r.seq.length} tokens from the store", (time.monotonic() - r.t0) * 1000,
                            restored_tokens=0, request_tokens=r.seq.length)
                continue
            self.install(r)
            self.ckpt.complete_copies(r)

    def install(self, r: Restore) -> None:
        """Install restored KV, once it is checked against this model; a checkpoint that does not
        fit is dropped and the request recomputed (its first write replaces it at the stores)."""
        seq, t0, (msg, k, v) = r.seq, r.t0, r.best
        # Keep at least the last known token to compute: its logits give the next token.
        n = min(msg.committed, seq.length - 1)
        misfit = self.misfit(k, v, n) if n > 0 else None
        if misfit:
            log.warning("%s: checkpoint of %s rejected: %s", self.spec.name, seq.req_id, misfit)
            self.report(EventKind.RESTORE_REJECTED, f"{seq.req_id}: {misfit}; recomputing", (time.monotonic() - t0) * 1000)
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
        self.report(EventKind.RESTORED, f"{seq.req_id}: {seq.num_computed} of {seq.length} tokens from the store", (time.monotonic() - t0) * 1000,
                    restored_tokens=seq.num_computed, request_tokens=seq.length)

    def misfit(self, k: torch.Tensor, v: torch.Tensor, n: int) -> str | None:
        """Why restored KV does not fit this model's cache (layers, positions, heads, dims, dtype), or
        None. k and v are checked against their own caches: under MLA they differ in shape."""
        for name, got, want in (("k", k, self.kv.k), ("v", v, self.kv.v)):
            if got.dim() != 4 or got.shape[0] != want.shape[0] or got.shape[2:] != want.shape[2:] or got.shape[1] < n:
                return f"{name} of shape {list(got.shape)}, this model needs [{want.shape[0]}, >={n}, {want.shape[2]}, {want.shape[3]}]"
            if got.dtype != want.dtype:
                return f"{name} in {got.dtype}, this model's cache is {want.dtype}"
        return None

    def report(self, kind: EventKind, detail: str, ms: float, **counts: int) -> None:
        self.orch.send(P.Report(kind, self.spec.name, detail, ms, **counts))


def run(spec: WorkerSpec, ctx: Context, orch: OrchestratorChannel) -> None:
    AttentionWorker(spec, ctx, orch).run()

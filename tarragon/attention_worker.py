"""Attention worker (AW): the stateful half of the model.

It owns a disjoint set of requests: their KV cache, their scheduling, their sampling. Each step it
runs attention for every scheduled token and sends routed tokens to the expert workers through
its forwarding engine. Requests arrive from, and tokens go back to, the control channel.
"""

from __future__ import annotations

import logging
import os

import torch
import zmq

from . import protocol as P
from .config import ModelConfig
from .forwarding_engine import ForwardingEngine, ShutdownRequested
from .kv_cache import KVCache
from .model import AttentionModel
from .model_runner import ModelRunner
from .scheduler import Scheduler, Sequence
from .weights import WeightFiles, torch_dtype

log = logging.getLogger(__name__)


def run(spec, ctx: zmq.Context, orch: zmq.Socket) -> None:
    cfg = ModelConfig.from_dir(spec.model_dir)
    dtype = torch_dtype(spec.dtype)
    with WeightFiles(spec.model_dir) as files:
        model = AttentionModel(cfg, files, dtype, spec.device)
    e = spec.engine
    kv = KVCache(cfg, e.kv_cache_blocks, e.block_size, dtype, spec.device)
    sched = Scheduler(kv, e.max_num_seqs, e.max_num_batched_tokens, e.max_model_len, cfg.eos_token_ids)
    engine = ForwardingEngine(spec.name, spec.table, spec.expert_endpoints, ctx, orch, spec.probe_endpoints_of_experts,
                              spec.probe_interval_s, spec.probe_timeout_s)
    runner = ModelRunner(model, kv, engine, e.micro_batches)
    driver = ctx.socket(zmq.DEALER)
    driver.setsockopt(zmq.IDENTITY, spec.name.encode())
    driver.setsockopt(zmq.LINGER, 0)
    driver.connect(spec.driver_endpoint)
    ready = P.Ready(spec.name, "attention", os.getpid(), {"kv_blocks": kv.num_blocks})
    driver.send_multipart(P.encode(ready))
    orch.send_multipart(P.encode(ready))
    poller = zmq.Poller()
    poller.register(driver, zmq.POLLIN)
    poller.register(orch, zmq.POLLIN)
    partial_logits: dict[str, list[torch.Tensor]] = {}
    try:
        while True:
            if not sched.has_work():
                poller.poll()  # idle: sleep until a request or a control message
            engine.service_control()
            handle_requests(driver, sched)
            chunks = sched.schedule()
            if not chunks:
                continue
            out = runner.step(chunks)
            for c in chunks:  # prompt logits go out once the whole prompt is computed
                if c.seq.req_id in out.prompt_logits:
                    partial_logits.setdefault(c.seq.req_id, []).append(out.prompt_logits[c.seq.req_id])
                    if c.start + c.count >= len(c.seq.prompt):
                        logits = torch.cat(partial_logits.pop(c.seq.req_id))
                        driver.send_multipart(P.encode(P.PromptLogits(c.seq.req_id, P.tensor_meta(logits)), logits), copy=False)
                        c.seq.params.prompt_logits = False  # not again after a preemption
            got = sched.update(chunks, out.sampled)
            driver.send_multipart(P.encode(P.Tokens(
                req_ids=[s.req_id for s in got], tokens=[s.output[-1] for s in got], finish=[s.finish_reason or "" for s in got],
                kv_used=kv.used, running=len(sched.running), waiting=len(sched.waiting), replayed=engine.replayed,
            )))
    except ShutdownRequested:
        return


def handle_requests(driver: zmq.Socket, sched: Scheduler) -> None:
    """Apply every pending message from the driver."""
    while driver.poll(0):
        try:
            msg, _ = P.decode(driver.recv_multipart())
        except P.BadMessage as e:
            log.warning("dropped driver message: %s", e)
            continue
        if isinstance(msg, P.AddRequest):
            sched.add(Sequence(msg.req_id, list(msg.prompt), msg.params))
        elif isinstance(msg, P.AbortRequest):
            for req_id in msg.req_ids:
                sched.abort(req_id)

"""Turns a scheduled step into tensors, runs it, samples.

A step runs as a `Flight`: the forward pass of one micro-batch, suspended at every MoE layer
while its routed tokens are with the expert workers. The attention worker keeps one flight per
micro-batch group in the air and advances them in turn, so while the expert workers run group A's
layer-l experts this worker computes group B's attention; and when A's step ends, A's next step
starts at once, while B's last layer is still with the experts, so the expert workers are not left
idle while this worker samples and does its bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import torch

from .kernels import threads
from .kv_cache import KVCache
from .model import AttentionMetadata, AttentionModel, MoECall
from .sampling import sample
from .scheduler import ScheduledChunk


@dataclass
class StepOutput:
    sampled: list[int]  # one per sampling chunk, in chunk order
    logprobs: list  # TokenLogprobs | None per sampled token (None unless its request asks)
    prompt_logits: dict[str, torch.Tensor]  # req_id -> [n, V] logits of prompt positions computed
    slots: torch.Tensor  # KV slots written this step, in chunk order (what gets checkpointed)


@dataclass(eq=False)
class Flight:
    """One micro-batch's step in progress: its generator and the expert call it waits for."""

    chunks: list[ScheduledChunk]
    meta: AttentionMetadata
    gen: Generator[MoECall, torch.Tensor, torch.Tensor]
    want_prompt: bool
    pending: object = None  # the ExpertFuture of the current MoE layer (None: done)
    hidden: torch.Tensor | None = None  # the final hidden states, once done


class ModelRunner:
    def __init__(self, model: AttentionModel, kv: KVCache, engine):
        self.model = model
        self.kv = kv
        self.engine = engine  # ForwardingEngine: dispatch(MoECall) -> future with .result() (None: interrupted)
        self.head_threads = 1  # threads of the LM head (set by the worker: more while other cores idle)

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, AttentionMetadata]:
        bs = self.kv.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tok, decode_len, decode_tables = [], [], []
        prefills = []
        logits_index = []
        for c in chunks:
            seq, start, n = c.seq, c.start, c.count
            t0 = len(tokens)
            tokens += seq.token_slice(start, start + n)
            positions += range(start, start + n)
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            ctx = start + n
            if n == 1 and start > 0:
                decode_tok.append(t0)
                decode_len.append(ctx)
                decode_tables.append(seq.blocks)
            else:
                mask = None
                if start > 0:  # a later prefill chunk: causal with an offset
                    mask = torch.arange(ctx)[None, :] <= torch.arange(start, ctx)[:, None]
                prefills.append((t0, n, self.kv.slots(seq.blocks, 0, ctx), mask))
            if c.samples:
                logits_index.append(t0 + n - 1)
        if decode_tok:
            C = max(decode_len)
            nblk = -(-C // bs)
            d_blocks = torch.tensor([t[:nblk] + [0] * (nblk - len(t)) for t in decode_tables], dtype=torch.long)
            valid = torch.arange(C)[None, :] < torch.tensor(decode_len)[:, None]
            d_mask = torch.zeros(valid.shape, dtype=self.model.dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :]
        else:
            d_blocks = torch.empty(0, 0, dtype=torch.long)
            d_mask = torch.empty(0, 1, 1, 0)
        all_decode = len(decode_tok) == len(tokens)
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            decode_tokens=None if all_decode else torch.tensor(decode_tok, dtype=torch.long),
            num_decode=len(decode_tok),
            decode_blocks=d_blocks,
            decode_mask=d_mask,
            decode_lens=torch.tensor(decode_len, dtype=torch.long),
            prefills=prefills,
            logits_index=torch.tensor(logits_index, dtype=torch.long),
        )
        device = self.kv.k.device
        return torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True), meta.to(device)

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk]) -> Flight:
        """Start a step: run it up to its first expert call (sent at once)."""
        want_prompt = any(c.seq.params.prompt_logits and c.start < len(c.seq.prompt) for c in chunks)
        tokens, meta = self.prepare(chunks)
        flight = Flight(chunks, meta, self.model.forward(tokens, meta, self.kv, all_logits=want_prompt), want_prompt)
        self._resume(flight, None)
        return flight

    @torch.inference_mode()
    def advance(self, flight: Flight) -> StepOutput | None:
        """Wait for the flight's experts, run it to its next expert call; at its end, sample and
        return the step's output (None while it is still in the air, or if the wait was
        interrupted: the worker is shutting down)."""
        value = flight.pending.result()
        if value is None:
            return None
        self._resume(flight, value)
        return None if flight.pending is not None else self._finish(flight)

    def _resume(self, flight: Flight, value: torch.Tensor | None) -> None:
        try:
            flight.pending = self.engine.dispatch(flight.gen.send(value))
        except StopIteration as stop:
            flight.pending, flight.hidden = None, stop.value

    def _finish(self, flight: Flight) -> StepOutput:
        meta = flight.meta
        with threads(self.head_threads):
            logits = self.model.logits(flight.hidden)  # every token's when prompt logits are wanted
        prompt_logits: dict[str, torch.Tensor] = {}
        if flight.want_prompt:
            t0 = 0
            for c in flight.chunks:
                if c.seq.params.prompt_logits and c.start < len(c.seq.prompt):
                    n = min(c.count, len(c.seq.prompt) - c.start)
                    prompt_logits[c.seq.req_id] = logits[t0 : t0 + n]
                t0 += c.count
            logits = logits[meta.logits_index]
        rows = [c for c in flight.chunks if c.samples]
        sampled, logprobs = sample(logits, [c.seq.params for c in rows], [len(c.seq.output) for c in rows],
                                   [(c.seq.prompt, c.seq.output) for c in rows]) if rows else ([], [])
        return StepOutput(sampled, logprobs, prompt_logits, meta.slot_mapping)

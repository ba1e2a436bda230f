"""Turns a scheduled step into tensors, runs it, samples.

A step is split into micro-batches whose forward passes ping-pong: while the expert workers run
micro-batch A's layer-l experts, this worker computes micro-batch B's layer-l attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .model import AttentionMetadata, AttentionModel
from .sampling import sample
from .scheduler import ScheduledChunk


@dataclass
class StepOutput:
    sampled: list[int]  # one per sampling chunk, in chunk order
    prompt_logits: dict[str, torch.Tensor]  # req_id -> [n, V] logits of prompt positions computed
    slots: torch.Tensor  # KV slots written this step, in chunk order (what gets checkpointed)


class ModelRunner:
    def __init__(self, model: AttentionModel, kv: KVCache, engine, micro_batches: int = 2):
        self.model = model
        self.kv = kv
        self.engine = engine  # ForwardingEngine: dispatch(MoECall) -> future with .result()
        self.micro_batches = max(1, micro_batches)

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
            table = torch.tensor([t[:nblk] + [0] * (nblk - len(t[:nblk])) for t in decode_tables], dtype=torch.long)
            pos = torch.arange(C)
            d_slots = table[:, pos // bs] * bs + pos % bs
            valid = pos[None, :] < torch.tensor(decode_len)[:, None]
            d_mask = torch.zeros(valid.shape, dtype=self.model.dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :]
        else:
            d_slots = torch.empty(0, 0, dtype=torch.long)
            d_mask = torch.empty(0, 1, 1, 0)
        all_decode = len(decode_tok) == len(tokens)
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            decode_tokens=None if all_decode else torch.tensor(decode_tok, dtype=torch.long),
            num_decode=len(decode_tok),
            decode_slots=d_slots,
            decode_mask=d_mask,
            prefills=prefills,
            logits_index=torch.tensor(logits_index, dtype=torch.long),
        )
        device = self.kv.k.device
        return torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True), meta.to(device)

    def split(self, chunks: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
        """Micro-batches of about equal token counts (whole chunks each)."""
        m = min(self.micro_batches, len(chunks))
        if m <= 1:
            return [chunks]
        total = sum(c.count for c in chunks)
        parts, cur, acc = [], [], 0
        for c in chunks:
            cur.append(c)
            acc += c.count
            if acc >= total * (len(parts) + 1) / m and len(parts) < m - 1:
                parts.append(cur)
                cur = []
        if cur:
            parts.append(cur)
        return parts

    @torch.inference_mode()
    def step(self, chunks: list[ScheduledChunk]) -> StepOutput:
        parts = self.split(chunks)
        want_prompt = [any(c.seq.params.prompt_logits and c.start < len(c.seq.prompt) for c in p) for p in parts]
        metas = [self.prepare(p) for p in parts]
        gens = [self.model.forward(tok, meta, self.kv, all_logits=w) for (tok, meta), w in zip(metas, want_prompt)]
        results: list[torch.Tensor | None] = [None] * len(gens)
        pending = {}
        for i, g in enumerate(gens):  # start every micro-batch up to its first expert call
            self._advance(i, g, None, pending, results)
        while pending:  # then in turn: collect one's experts, run it to its next call
            for i in list(pending):
                self._advance(i, gens[i], pending.pop(i).result(), pending, results)

        prompt_logits: dict[str, torch.Tensor] = {}
        finals = []  # per micro-batch: final hidden states of the tokens that sample
        for part, (_tok, meta), h, w in zip(parts, metas, results, want_prompt):
            if w:
                logits = self.model.logits(h)
                t0 = 0
                for c in part:
                    if c.seq.params.prompt_logits and c.start < len(c.seq.prompt):
                        n = min(c.count, len(c.seq.prompt) - c.start)
                        prompt_logits[c.seq.req_id] = logits[t0 : t0 + n]
                    t0 += c.count
                h = h[meta.logits_index]
            finals.append(h)
        rows = [c for part in parts for c in part if c.samples]
        sampled = sample(self.model.logits(torch.cat(finals)), [c.seq.params for c in rows], [len(c.seq.output) for c in rows]) if rows else []
        return StepOutput(sampled, prompt_logits, torch.cat([meta.slot_mapping for _, meta in metas]))

    def _advance(self, i, gen, value, pending, results) -> None:
        try:
            call = gen.send(value)
        except StopIteration as stop:
            results[i] = stop.value
            return
        pending[i] = self.engine.dispatch(call)

"""Continuous batching for one attention worker.

Every step, running sequences get their next token (or next prefill chunk) first, then waiting
sequences are admitted while the batch has room (`max_num_seqs`, `max_num_batched_tokens`) and the
KV pool has blocks. When a running sequence needs a block and the pool is empty, the newest
running sequence is preempted: its blocks are freed and it is recomputed later from its prompt
plus the tokens it already generated, so its output is unchanged.

Running sequences belong to one of `groups` micro-batch groups, each scheduled as its own step
(the attention worker keeps one step of each group in flight at once, see model_runner). A new
sequence joins the group being scheduled while that group is below its fair share. A group's step
touches only its own sequences: preemption picks victims within the group, and an abort of a
sequence whose step is in flight takes effect when that step ends, so no block is freed while a
step may still write it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import KVCache
from .sampling import SamplingParams
from .vocabulary import FinishReason


@dataclass(eq=False)  # identity, not field-by-field comparison
class Sequence:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    max_chunk: int | None = None  # 1: recompute token by token (the `replay` baseline)
    group: int = 0  # the micro-batch group it runs in, once admitted
    aborted: bool = False  # aborted while its step was in flight: dropped when that step ends
    stop_ids: frozenset[int] = field(init=False)  # params.stop_token_ids as a set: one lookup per token

    def __post_init__(self) -> None:
        self.stop_ids = frozenset(self.params.stop_token_ids or ())

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt)
        if start >= n:
            return self.output[start - n : end - n]
        return (self.prompt + self.output)[start:end]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step
    count: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last known token, so a new token is sampled."""
        return self.start + self.count == self.seq.length


class Scheduler:
    def __init__(self, kv: KVCache, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...], groups: int = 1, split_min: int = 1):
        self.kv = kv
        self.groups = max(1, groups)
        self.split_min = split_min  # sequences per group below which a batch is not split
        self.in_flight: set[int] = set()  # groups whose step is being computed (set by the caller)
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue a request; `front` for resumed ones, which have waited long enough."""
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def abort(self, req_id: str) -> None:
        for seq in [s for s in self.running if s.req_id == req_id]:
            if seq.group in self.in_flight:
                seq.aborted = True  # its step may still write its blocks: released in update()
                continue
            self.kv.release(seq.blocks)
            self.running.remove(seq)
        self.waiting = deque(s for s in self.waiting if s.req_id != req_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def split(self) -> bool:
        """Whether the running sequences are in more than one group (a step in several micro-batches)."""
        return any(s.group != self.running[0].group for s in self.running)

    def _members(self, group: int) -> list[Sequence]:
        return [s for s in self.running if s.group == group]

    def _preempt(self, seq: Sequence) -> None:
        self.kv.release(seq.blocks)  # its KV is recomputed from its tokens when it runs again
        seq.num_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self, group: int = 0) -> list[ScheduledChunk]:
        """The next step of `group`: its running sequences first, then admissions."""
        budget = self.max_tokens
        chunks: list[ScheduledChunk] = []
        members = self._members(group)
        for seq in members:
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            n = min(seq.length - seq.num_computed, budget, seq.max_chunk or budget)
            if n <= 0:
                continue
            while not self.kv.grow(seq.blocks, seq.num_computed + n):
                victim = [s for s in members if s in self.running][-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, seq.num_computed, n))
                budget -= n
        # A group's fair share; a batch too small to split (split_min per group) all goes to group 0.
        total = len(self.running) + len(self.waiting)
        groups = self.groups if total >= self.groups * self.split_min else 1
        share = -(-total // groups) if group < groups else 0
        size = len(self._members(group))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and size < share:
            seq = self.waiting[0]
            # Admit only if the whole known context fits now, so admissions do not thrash.
            if self.kv.blocks_needed(seq.blocks, seq.length + 1) > len(self.kv.free):
                break
            n = min(seq.length - seq.num_computed, budget, seq.max_chunk or budget)
            self.kv.grow(seq.blocks, seq.num_computed + n)
            self.waiting.popleft()
            seq.group = group
            self.running.append(seq)
            size += 1
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return chunks

    def update(self, chunks: list[ScheduledChunk], sampled: list[int]) -> list[Sequence]:
        """Record computed tokens and sampled ones (one per sampling chunk, in order);
        returns the sequences that got a token this step."""
        got = []
        it = iter(sampled)
        for c in chunks:
            seq = c.seq
            seq.num_computed = c.start + c.count
            tok = next(it) if c.samples else None
            if seq.aborted:
                if seq in self.running:
                    self.kv.release(seq.blocks)
                    self.running.remove(seq)
                continue
            if tok is None:
                continue
            seq.output.append(tok)
            p = seq.params
            if (tok in self.eos and not p.ignore_eos) or tok in seq.stop_ids:
                seq.finish_reason = FinishReason.STOP
            elif len(seq.output) >= p.max_tokens or seq.length >= self.max_model_len:
                seq.finish_reason = FinishReason.LENGTH
            got.append(seq)
            if seq.finish_reason:
                self.kv.release(seq.blocks)
                self.running.remove(seq)
        return got

"""The scheduler in-process: micro-batch groups, fair-share admission, aborts and preemption that
never touch a step in flight."""

from __future__ import annotations

import torch

from tarragon.config import ModelConfig
from tarragon.kv_cache import KVCache
from tarragon.sampling import SamplingParams
from tarragon.scheduler import Scheduler, Sequence


def kv_cache(blocks: int) -> KVCache:
    cfg = ModelConfig.__new__(ModelConfig)  # only the shape fields the pool reads
    for k, v in dict(num_layers=1, num_kv_heads=1, head_dim=2).items():
        object.__setattr__(cfg, k, v)
    return KVCache(cfg, blocks, 4, torch.float32)


def seq(i: int, prompt_len: int = 3, max_tokens: int = 100) -> Sequence:
    return Sequence(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, temperature=0.0))


def test_groups_share_the_requests_fairly():
    s = Scheduler(kv_cache(64), max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64, eos_token_ids=(0,), groups=2)
    for i in range(5):
        s.add(seq(i))
    a = s.schedule(0)
    b = s.schedule(1)
    assert [c.seq.req_id for c in a] == ["r0", "r1", "r2"] and [c.seq.req_id for c in b] == ["r3", "r4"]
    assert {c.seq.group for c in a} == {0} and {c.seq.group for c in b} == {1}
    s.update(a, [7] * len(a))
    s.add(seq(5))  # a late arrival joins the smaller group
    assert [c.seq.req_id for c in s.schedule(0)] == ["r0", "r1", "r2"]
    assert [c.seq.req_id for c in s.schedule(1)] == ["r3", "r4", "r5"]


def test_a_batch_is_split_only_from_split_min_per_group():
    s = Scheduler(kv_cache(64), max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64, eos_token_ids=(0,), groups=2,
                  split_min=3)
    for i in range(5):
        s.add(seq(i))
    assert len(s.schedule(0)) == 5 and s.schedule(1) == [] and not s.split  # 5 < 2 x 3: one group
    s.add(seq(5))  # now 2 x 3: the batch splits
    assert [c.seq.req_id for c in s.schedule(1)] == ["r5"] and s.split
    s = Scheduler(kv_cache(64), max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64, eos_token_ids=(0,), groups=2,
                  split_min=3)
    for i in range(6):
        s.add(seq(i))
    assert len(s.schedule(0)) == 3 and len(s.schedule(1)) == 3  # fair shares once split


def test_one_group_takes_everything_when_alone():
    s = Scheduler(kv_cache(64), max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64, eos_token_ids=(0,), groups=1)
    for i in range(5):
        s.add(seq(i))
    assert len(s.schedule(0)) == 5


def test_abort_of_a_sequence_in_flight_waits_for_its_step():
    kv = kv_cache(8)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64, eos_token_ids=(0,), groups=2)
    s.add(seq(0))
    chunks = s.schedule(0)
    s.in_flight.add(0)
    free_before = len(kv.free)
    s.abort("r0")
    assert len(kv.free) == free_before  # its step may still write those blocks
    got = s.update(chunks, [5])
    assert got == [] and not s.running and len(kv.free) == 8  # released once the step is over
    s.in_flight.discard(0)


def test_preemption_stays_within_the_group():
    kv = kv_cache(3)  # 12 token slots
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64, eos_token_ids=(0,), groups=2)
    s.add(seq(0, prompt_len=4))
    s.add(seq(1, prompt_len=4))
    a, b = s.schedule(0), s.schedule(1)
    s.in_flight.add(1)  # group 1's step is in the air
    s.update(a, [9])  # r0 now needs a second block; group 0 has no one else to preempt
    kv.free.clear()  # the pool is exhausted
    assert s.schedule(0) == []  # r0 preempted itself rather than r1, whose step is in flight
    assert [q.req_id for q in s.running] == ["r1"] and s.waiting[0].req_id == "r0"
    assert b[0].seq.blocks  # r1 keeps its blocks


def sched(blocks: int = 64, max_num_seqs: int = 8, max_tokens: int = 100, max_model_len: int = 64, groups: int = 1) -> Scheduler:
    return Scheduler(kv_cache(blocks), max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens,
                     max_model_len=max_model_len, eos_token_ids=(0,), groups=groups)


def run_step(s: Scheduler, token: int = 7, group: int = 0) -> list:
    """One step of `group`: every sampling chunk gets `token`; returns the chunks."""
    chunks = s.schedule(group)
    s.update(chunks, [token] * sum(c.samples for c in chunks))
    return chunks


def test_admission_respects_the_sequence_and_token_limits():
    s = sched(max_num_seqs=2, max_tokens=8)
    for i in range(3):
        s.add(seq(i, prompt_len=3))
    chunks = run_step(s)
    assert [(c.seq.req_id, c.start, c.count) for c in chunks] == [("r0", 0, 3), ("r1", 0, 3)]  # max_num_seqs
    assert [q.req_id for q in s.waiting] == ["r2"]
    s.add(seq(3, prompt_len=3), front=True)  # a resumed request goes first
    assert [q.req_id for q in s.waiting] == ["r3", "r2"]
    s = sched(max_num_seqs=8, max_tokens=8)
    for i in range(3):
        s.add(seq(i, prompt_len=3))
    assert [(c.seq.req_id, c.count) for c in s.schedule(0)] == [("r0", 3), ("r1", 3), ("r2", 2)]  # 8 tokens: r2 in part


def test_a_request_is_admitted_only_when_its_whole_context_fits():
    s = sched(blocks=3)  # 12 token slots
    s.add(seq(0, prompt_len=7))  # needs 2 blocks for its 7 + 1 tokens
    s.add(seq(1, prompt_len=7))
    assert [c.seq.req_id for c in run_step(s)] == ["r0"]  # r1 would not fit: it waits, nothing thrashes
    assert [q.req_id for q in s.waiting] == ["r1"] and s.kv.used == 2


def test_a_long_prompt_is_prefilled_in_chunks_and_samples_once():
    s = sched(max_tokens=4)
    s.add(seq(0, prompt_len=10))
    steps = []
    for _ in range(4):
        (c,) = s.schedule(0)
        steps.append((c.start, c.count, c.samples))
        s.update([c], [5] if c.samples else [])
    assert steps == [(0, 4, False), (4, 4, False), (8, 2, True), (10, 1, True)]
    r0 = s.running[0]
    assert r0.output == [5, 5] and r0.num_computed == 11 and len(r0.blocks) == 3


def test_a_preempted_request_is_recomputed_with_its_tokens():
    s = sched(blocks=3)  # 12 token slots, block size 4
    s.add(seq(0, prompt_len=4))
    s.add(seq(1, prompt_len=4))
    run_step(s, token=9)  # both prefilled, each sampled one token: both need a second block now
    s.kv.free[:] = s.kv.free[:1]  # one free block left
    chunks = run_step(s, token=8)
    assert [c.seq.req_id for c in chunks] == ["r0"]  # r1, the newest, gave its blocks up
    r1 = s.waiting[0]
    assert r1.req_id == "r1" and r1.num_computed == 0 and not r1.blocks and r1.output == [9]
    s.abort("r0")  # room again: r1 is recomputed from its prompt and its token, then goes on
    chunks = run_step(s, token=6)
    assert [(c.seq.req_id, c.start, c.count) for c in chunks] == [("r1", 0, 5)] and r1.output == [9, 6]


def test_requests_end_on_eos_stop_tokens_max_tokens_and_the_context_length():
    s = sched(max_model_len=6)
    params = {"eos": SamplingParams(max_tokens=9, temperature=0.0), "ignored": SamplingParams(max_tokens=2, ignore_eos=True),
              "stop_id": SamplingParams(max_tokens=9, stop_token_ids=[0, 4]), "short": SamplingParams(max_tokens=1),
              "long": SamplingParams(max_tokens=99)}
    for name, p in params.items():
        s.add(Sequence(name, [1, 2, 3], p))
    got = s.update(s.schedule(0), [0, 0, 4, 5, 5])
    assert {q.req_id: q.finish_reason for q in got} == {"eos": "stop", "ignored": None, "stop_id": "stop", "short": "length", "long": None}
    got = run_step(s, token=5)
    assert {c.seq.req_id: c.seq.finish_reason for c in got} == {"ignored": "length", "long": None}
    got = run_step(s, token=5)
    assert [(c.seq.req_id, c.seq.finish_reason, c.seq.length) for c in got] == [("long", "length", 6)]  # max_model_len
    assert not s.running and s.kv.used == 0  # every finished request gave its blocks back

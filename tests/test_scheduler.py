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

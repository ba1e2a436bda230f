"""Components in-process, without a cluster: the KV cache, the sampler, the routing table, shadow
placement, the checkpoint store, receiving and the worker entry point. Each test states a
property the running system relies on."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

from tarragon import protocol as P
from tarragon.checkpoint_store import CheckpointStore
from tarragon.config import ModelConfig
from tarragon.kv_cache import KVCache
from tarragon.routing_table import RoutingTable
from tarragon.sampling import SamplingParams, argmax_rows, sample
from tarragon.shadow_placement import place

# ---- KV cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_kv_cache_pool_is_bounded_and_slots_follow_the_block_table(tiny_models, family):
    cfg = ModelConfig.from_dir(tiny_models[family])
    kv = KVCache(cfg, num_blocks=5, block_size=4, dtype=torch.float32)
    (ha, da), (hb, db) = cfg.kv_shapes()
    assert kv.k.shape == (cfg.num_layers, 20, ha, da) and kv.v.shape == (cfg.num_layers, 20, hb, db)
    a, b = [], []
    assert kv.grow(a, 9) and len(a) == 3 and kv.used == 3  # 9 tokens: 3 blocks of 4
    assert not kv.grow(b, 12) and b == [] and kv.used == 3  # 3 more blocks do not fit: nothing taken
    assert kv.grow(b, 8) and kv.used == 5 and not set(a) & set(b)
    slots = kv.slots(a, 2, 9).tolist()
    assert slots == [a[p // 4] * 4 + p % 4 for p in range(2, 9)]
    kv.release(a)
    assert a == [] and kv.used == 2 and kv.grow(a, 12)  # released blocks serve the next sequence
    with pytest.raises(ValueError):
        KVCache(cfg, 0, 4, torch.float32)



@pytest.mark.parametrize("kernel", ["paged", "torch"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "glm4_moe"])
def test_decode_attention_over_scattered_blocks_equals_prefill(tiny_models, family, kernel, monkeypatch):
    """A decode step over a scattered pool (gpt-oss: sinks and sliding windows; DeepSeek: the
    latent path), by the paged kernel where it applies, or with the context gathered block by
    block, padded and masked, attended all at once or one sequence at a time (decode_in_chunks),
    gives each sequence's last token the hidden state a prefill of the whole sequence gives it
    (routed experts stubbed to zero on both sides)."""
    from tarragon import model as M
    from tarragon import paged_attention

    if kernel == "torch":
        monkeypatch.setattr(paged_attention, "usable", lambda *a: False)
    elif not paged_attention.available():
        pytest.skip("no C compiler: the paged attention kernel is not built here")
    from tarragon.model_runner import ModelRunner
    from tarragon.scheduler import ScheduledChunk, Sequence
    from tarragon.weights import WeightFiles

    cfg = ModelConfig.from_dir(tiny_models[family])
    with WeightFiles(tiny_models[family]) as files:
        model = M.AttentionModel(cfg, files, torch.float32)

    def run(runner: ModelRunner, chunks: list) -> torch.Tensor:
        gen = model.forward(*runner.prepare(chunks), runner.kv)
        try:
            call = next(gen)
            while True:
                call = gen.send(torch.zeros_like(call.hidden))
        except StopIteration as stop:
            return stop.value

    def step(lengths: list[int], decode: bool) -> torch.Tensor:
        kv = KVCache(cfg, num_blocks=64, block_size=4, dtype=torch.float32)
        kv.free = kv.free[::-1][7::3] + kv.free[::-1][:7:2]  # scattered, out of order
        runner, g = ModelRunner(model, kv, None), torch.Generator().manual_seed(0)
        seqs = [Sequence(f"r{i}", torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist(), SamplingParams()) for i, n in enumerate(lengths)]
        for s in seqs:
            assert kv.grow(s.blocks, len(s.prompt))
        if not decode:
            return run(runner, [ScheduledChunk(s, 0, len(s.prompt)) for s in seqs])
        run(runner, [ScheduledChunk(s, 0, len(s.prompt) - 1) for s in seqs])
        return run(runner, [ScheduledChunk(s, len(s.prompt) - 1, 1) for s in seqs])

    lengths = [3, 13, 6, 17, 9]  # past the tiny gpt-oss window (8), across blocks of 4
    want = step(lengths, decode=False)
    torch.testing.assert_close(step(lengths, decode=True), want, atol=1e-4, rtol=0)
    if kernel == "torch":
        monkeypatch.setattr(M, "DECODE_CHUNK_BYTES", 1)  # one sequence per chunk
        torch.testing.assert_close(step(lengths, decode=True), want, atol=1e-4, rtol=0)


def test_add_rms_norm_matches_torch_and_rows_do_not_depend_on_the_batch():
    """The C residual sum + RMSNorm: the sum exact, the norm within float rounding of torch's,
    and a row's result bit-identical alone or in a batch."""
    import torch.nn.functional as F

    from tarragon import paged_attention

    if not paged_attention.available():
        pytest.skip("no C compiler: the kernels are not built here")
    gen = torch.Generator().manual_seed(0)
    h, delta, w = torch.randn(13, 256, generator=gen) * 4, torch.randn(13, 256, generator=gen), torch.randn(256, generator=gen)
    summed, normed = paged_attention.add_rms_norm(h, delta, w, 1e-6)
    assert torch.equal(summed, h + delta)
    torch.testing.assert_close(normed, F.rms_norm(h + delta, (256,), w, 1e-6), rtol=1e-6, atol=1e-6)
    alone = paged_attention.add_rms_norm(h[5:6].clone(), delta[5:6].clone(), w, 1e-6)[1]
    assert torch.equal(alone, normed[5:6])
    same, only = paged_attention.add_rms_norm(h, None, w, 1e-6)
    assert same is h and torch.equal(only, paged_attention.add_rms_norm(h.clone(), None, w, 1e-6)[1])
    torch.testing.assert_close(only, F.rms_norm(h, (256,), w, 1e-6), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T, heads, kvh, d, rot", [(1, 8, 4, 32, 32), (9, 16, 2, 64, 64), (5, 4, 2, 64, 32)])
def test_rope_store_is_bit_identical_to_the_torch_ops(T, heads, kvh, d, rot):
    """The one-pass rotary embedding and KV write gives exactly what apply_rope and index_copy_
    give (full and partial rotary dims), and writes only the step's slots."""
    from tarragon import paged_attention
    from tarragon.model import apply_rope

    if not paged_attention.available():
        pytest.skip("no C compiler: the kernels are not built here")
    gen = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, (heads + 2 * kvh) * d, generator=gen) * 3
    freqs = torch.randint(0, 4000, (T,), generator=gen)[:, None].float() / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    slots = torch.randperm(64, generator=gen)[:T]
    k_pool, v_pool = torch.randn(64, kvh, d, generator=gen), torch.randn(64, kvh, d, generator=gen)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    q = paged_attention.rope_store(qkv, cos, sin, k_pool, v_pool, slots, heads)
    qk = apply_rope(qkv[:, : (heads + kvh) * d].view(T, -1, d), cos, sin, False)
    want_k.index_copy_(0, slots, qk[:, heads:])
    want_v.index_copy_(0, slots, qkv[:, (heads + kvh) * d :].view(T, -1, d))
    assert torch.equal(q, qk[:, :heads]) and torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)


@pytest.mark.parametrize("d, kvh, g", [(32, 4, 2), (64, 2, 4), (128, 8, 1), (24, 1, 3)])
def test_paged_decode_attention_equals_sdpa_and_rows_do_not_depend_on_the_batch(d, kvh, g):
    """The paged kernel, reading each sequence's context where it lies in a scattered pool, gives
    what gathering it and SDPA give (grouped-query heads, a sliding window, sinks, a query that
    is a strided view as the projection leaves it), and a sequence's result is bit-identical
    alone or in a batch (a request resumed elsewhere continues as it would have)."""
    from tarragon import paged_attention
    from tarragon.model import gather_blocks, softmax_with_sinks

    if not paged_attention.available():
        pytest.skip("no C compiler: the paged attention kernel is not built here")
    gen = torch.Generator().manual_seed(d)
    bs, nblocks, lens = 4, 48, torch.tensor([1, 7, 12, 33, 5])
    k_pool, v_pool = torch.randn(nblocks * bs, kvh, d, generator=gen), torch.randn(nblocks * bs, kvh, d, generator=gen)
    blocks = torch.randperm(nblocks, generator=gen)[: 5 * 9].view(5, 9)
    qkv = torch.randn(5, kvh * g + 2, d, generator=gen)
    q = qkv[:, : kvh * g]  # not contiguous: rows kvh*g+2 heads apart
    sinks = torch.randn(kvh * g, generator=gen)
    for window, with_sinks in ((0, False), (6, False), (0, True), (6, True)):
        s = sinks if with_sinks else None
        got = paged_attention.decode_attention(q, k_pool, v_pool, blocks, lens, bs, d ** -0.5, window, s)
        C = int(lens.max())
        k, v = gather_blocks(k_pool, blocks, bs, C), gather_blocks(v_pool, blocks, bs, C)  # [B, C, kvh, d]
        pos = torch.arange(C)[None, :]
        keep = (pos < lens[:, None]) & ((pos >= lens[:, None] - window) if window else True)
        mask = torch.zeros(5, C).masked_fill_(~keep, float("-inf"))[:, None, None, :]
        scores = torch.matmul(q.reshape(5, kvh, g, d), k.permute(0, 2, 3, 1)) * d ** -0.5 + mask
        probs = softmax_with_sinks(scores, s.view(1, kvh, g, 1) if with_sinks else None)
        want = torch.matmul(probs, v.transpose(1, 2)).view(5, kvh * g, d)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        for b in range(5):
            alone = paged_attention.decode_attention(q[b : b + 1], k_pool, v_pool, blocks[b : b + 1, : -(-int(lens[b]) // bs)],
                                                     lens[b : b + 1], bs, d ** -0.5, window, s)
            assert torch.equal(alone[0], got[b])

# ---- sampler ------------------------------------------------------------------------------


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_and_top_k_1_are_argmax():
    logits = logits_rows(4)
    want = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=0.0)] * 4, [0] * 4)[0] == want
    assert sample(logits, [SamplingParams(temperature=1.0, top_k=1, seed=3)] * 4, [0] * 4)[0] == want


def test_seeded_draws_do_not_depend_on_the_batch():
    """A request may move between workers and batches on failover: its tokens must not change."""
    logits = logits_rows(6)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=i) for i in range(6)]
    alone = [sample(logits[i : i + 1], [params[i]], [7])[0][0] for i in range(6)]
    together = sample(logits, params, [7] * 6)[0]
    reversed_ = sample(logits.flip(0), params[::-1], [7] * 6)[0][::-1]
    assert alone == together == reversed_


def test_seeded_draws_follow_the_softmax():
    """Over many seeds, each token is drawn with its softmax probability (temperature applied)."""
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    p = SamplingParams(temperature=0.7, seed=0)
    n = 4000
    counts = torch.zeros(5)
    for s in range(n):
        tok = sample(row, [SamplingParams(temperature=p.temperature, seed=s)], [0])[0][0]
        counts[tok] += 1
    want = torch.softmax(row[0] / p.temperature, -1)
    sd = (want * (1 - want) / n).sqrt()
    assert ((counts / n - want).abs() < 5 * sd + 1e-3).all(), (counts / n, want)


def test_top_p_and_min_p_cut_the_tail():
    row = torch.tensor([[3.0, 2.9, 0.0, -1.0, -2.0]])  # two likely tokens, a tail
    for s in range(200):
        assert sample(row, [SamplingParams(temperature=1.0, top_p=0.8, seed=s)], [0])[0][0] in (0, 1)
        assert sample(row, [SamplingParams(temperature=1.0, min_p=0.2, seed=s)], [0])[0][0] in (0, 1)


def test_logprobs_are_the_models_log_softmax():
    logits = logits_rows(2)
    toks, lps = sample(logits, [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)], [0, 0])
    lsm = torch.log_softmax(logits[0], -1)
    assert lps[1] is None and lps[0].ids[0] == toks[0]
    assert lps[0].ids[1:] == torch.topk(lsm, 3).indices.tolist()
    assert all(math.isclose(got, float(lsm[i]), abs_tol=1e-5) for got, i in zip(lps[0].logprobs, lps[0].ids))


# ---- routing table and shadow placement -----------------------------------------------------


def test_shadows_are_elsewhere_spread_and_within_budget():
    workers = ["ew0", "ew1", "ew2"]
    table = place(8, [0, 1], workers, shadows=1)
    for row in table.candidates:
        for cands in row:
            assert len(cands) == 2 and cands[0] != cands[1]
    for dead in workers:  # a failed worker's experts are shared by every other worker, not dumped on one
        takers = {cands[1] for row in table.candidates for cands in row if cands[0] == dead}
        assert takers == set(workers) - {dead}
    nodes = {"ew0": "a", "ew1": "a", "ew2": "b"}
    for row in place(8, [0], workers, shadows=1, nodes=nodes).candidates:
        assert all(nodes[c[0]] != nodes[s] for c in row for s in c[1:])  # never on the primary's node
    budget = place(8, [0, 1], workers, shadows=1, expert_bytes=10, budget_bytes=30)
    assert all(len(budget.shadows_of(w)) * 10 <= 30 for w in workers)
    assert len(budget.unavailable()) == 0
    two = place(8, [0], workers, shadows=1, primaries=2)  # on two cores: ew2 stands by
    assert two.owners(0) == ["ew0"] * 4 + ["ew1"] * 4
    assert all(len(c) == 2 for c in two.candidates[0])
    assert {c[0] for c in two.candidates[0] if c[1] == "ew2"} == {"ew0", "ew1"}  # the standby backs both
    packed = place(8, [0], workers, shadows=1, primaries=2, pack=True)  # ew0 also holds ew1's experts
    assert packed.owners(0, prefer="ew0") == ["ew0"] * 8 and packed.owners(0) == two.owners(0)
    assert packed.owners(0, {"ew0"}, prefer="ew0") == [c[1] for c in packed.candidates[0][:4]] + ["ew1"] * 4  # ew0 dead
    assert sorted(c[1] for c in packed.candidates[0][:4]) == ["ew1", "ew1", "ew2", "ew2"]  # ew0's spread out


def test_routing_table_skips_failed_workers_and_follows_replacements():
    table = place(4, [1], ["ew0", "ew1"], shadows=1)
    assert table.owners(1) == ["ew0", "ew0", "ew1", "ew1"]
    assert table.owners(1, {"ew0"}) == ["ew1", "ew1", "ew1", "ew1"]  # the shadows take over
    assert table.owners(1, {"ew0", "ew1"}) == [None] * 4
    live = table.with_workers(3, {"ew0": None, "ew1": "ew1"})  # ew0 dead, not yet replaced
    assert live.version == 3 and live.owners(1) == ["ew1"] * 4
    replaced = table.with_workers(4, {"ew0": "ew2", "ew1": "ew1"})
    assert replaced.owners(1) == ["ew2", "ew2", "ew1", "ew1"] and replaced.experts_of("ew2") == table.experts_of("ew0")
    gone = table.with_workers(5, {"ew0": None, "ew1": None})
    assert gone.unavailable() == [(1, e) for e in range(4)]
    assert isinstance(gone, RoutingTable)


# ---- checkpoint store -------------------------------------------------------------------------


def kv_write(seq: int, items: list[tuple[str, int, int]], finished: list[str] | None = None, layers: int = 2):
    n = sum(c for _, _, c in items)
    k = torch.arange(layers * n * 2 * 3, dtype=torch.float32).reshape(layers, n, 2, 3) + 1000 * seq
    v = -k
    msg = P.KVWrite(seq, [r for r, _, _ in items], [s for _, s, _ in items], [c for _, _, c in items],
                    P.tensor_meta(k), P.tensor_meta(v), finished or [])
    return msg, k, v


def held_bytes(store: CheckpointStore) -> int:
    """Bytes of the memory the store's checkpoints keep alive: arrays of their own, not views of
    the writes that carried them (those would keep whole writes alive)."""
    arrays = [a for cp in store.requests.values() for c in cp.chunks for a in (c.kb, c.vb)]
    assert all(a.base is None for a in arrays)
    return sum(a.nbytes for a in arrays)


def test_store_commits_contiguous_prefixes_and_freezes_at_a_hole():
    store = CheckpointStore(1 << 20)
    m, k0, _ = kv_write(0, [("a", 0, 3), ("b", 0, 2)])
    store.write("aw0", m, k0, -k0)
    m, k1, _ = kv_write(1, [("a", 3, 1)])
    store.write("aw0", m, k1, -k1)
    n, k, v = store.restore("a")
    assert n == 4 and torch.equal(k, torch.cat([k0[:, :3], k1], dim=1)) and torch.equal(v, -k)
    m, k3, _ = kv_write(3, [("a", 5, 1)])  # write 2 (position 4) was dropped: a hole
    store.write("aw0", m, k3, -k3)
    assert store.restore("a")[0] == 4 and store.stats()["gaps"] == 1  # restorable up to the hole
    m, k4, _ = kv_write(4, [("a", 6, 1)])
    store.write("aw0", m, k4, -k4)
    assert store.restore("a")[0] == 4  # frozen: later writes do not extend it
    m, k5, _ = kv_write(5, [("a", 0, 7)])  # recomputed from scratch: a fresh checkpoint
    store.write("aw0", m, k5, -k5)
    assert store.restore("a")[0] == 7


def test_store_memory_is_what_it_holds_and_ended_requests_are_dropped():
    store = CheckpointStore(max_bytes=2 * 5 * 2 * 3 * 4 * 2)  # room for 5 positions of k and v
    m, k, _ = kv_write(0, [("a", 0, 3), ("b", 0, 3)])
    store.write("aw0", m, k, -k)
    assert store.bytes == held_bytes(store) == 2 * 3 * 2 * 3 * 4 * 2  # a: 3 positions; b (over budget) frozen empty
    assert store.restore("b")[0] == 0 and store.refused == 1
    m, k, _ = kv_write(1, [], finished=["a", "b"])
    store.write("aw0", m, k, -k)
    assert store.bytes == 0 and store.requests == {}


def test_store_chunks_grow_within_the_budget_and_keep_positions_exact(monkeypatch):
    """A request's KV: its first write held exactly, then chunks of CHUNK positions (here 4), or
    just what a write needs near the budget; what does not fit freezes the request (its spare
    room given back). Restores are exactly the positions written, across chunks, truncations
    (a recompute from an earlier position) and recomputes from scratch."""
    from tarragon import checkpoint_store

    monkeypatch.setattr(checkpoint_store, "CHUNK", 4)
    per_position = 2 * (2 * 2 * 3 * 4)  # k and v, 2 layers, 2 heads, dim 3, fp32
    store = CheckpointStore(max_bytes=12 * per_position)
    want: dict[str, torch.Tensor] = {}
    seq = iter(range(100))

    def write(req: str, start: int, n: int, kept: bool = True) -> None:
        m, k, _ = kv_write(next(seq), [(req, start, n)])
        store.write("aw0", m, k, -k)
        if kept:
            want[req] = torch.cat([want[req][:, :start], k], 1) if start else k

    def check(capacities: dict[str, int]) -> None:
        assert {r: cp.capacity for r, cp in store.requests.items()} == capacities
        assert store.bytes == held_bytes(store) == sum(capacities.values()) * per_position <= store.max_bytes
        for r, kv in want.items():
            n, k, v = store.restore(r)
            assert n == kv.shape[1] and torch.equal(k, kv) and torch.equal(v, -kv)

    write("a", 0, 3)
    for pos in (3, 4, 5):
        write("a", pos, 1)
    check({"a": 7})  # 3, then a chunk of 4
    write("b", 0, 3)
    write("a", 6, 1)
    write("a", 7, 1)  # a chunk of 4 would not fit: one of 1
    check({"a": 8, "b": 3})
    write("b", 2, 1)  # recomputed from position 2: truncated, then extended in place
    write("a", 6, 1)  # recomputed from position 6: its last chunk (from 7) is given back
    check({"a": 7, "b": 3})
    write("a", 7, 3, kept=False)  # over budget: refused, a keeps its 7 positions
    assert store.refused == 1
    check({"a": 7, "b": 3})
    del want["a"]
    m, k, _ = kv_write(next(seq), [("c", 0, 0)], finished=["a"])
    store.write("aw0", m, k, -k)
    write("b", 3, 1)
    write("b", 4, 1)
    check({"b": 7, "c": 0})
    write("b", 6, 1, kept=False)  # a hole: frozen at 5 positions, its spare room given back
    check({"b": 5, "c": 0})
    write("b", 0, 2)  # recomputed from scratch: a fresh checkpoint
    write("b", 2, 1)
    check({"b": 6, "c": 0})


def test_store_ties_each_checkpoint_to_its_owner_until_a_handover():
    store = CheckpointStore(1 << 20)
    m, k, _ = kv_write(0, [("a", 0, 2)])
    store.write("aw0", m, k, -k)
    m, k, _ = kv_write(0, [("a", 2, 1)], finished=["a"])  # another worker writes and drops it: refused
    store.write("aw1", m, k, -k)
    assert store.restore("a")[0] == 2 and store.stats()["foreign"] == 2
    assert store.may_restore("aw0", "a") and not store.may_restore("aw1", "a")
    store.hand_over(P.Handover(["a"], "aw1"))  # the driver moved it to aw1
    assert store.may_restore("aw1", "a") and not store.may_restore("aw0", "a")
    m, k, _ = kv_write(1, [("a", 2, 1)])
    store.write("aw1", m, k, -k)
    assert store.restore("a")[0] == 3


def test_a_fenced_attention_worker_touches_no_checkpoint():
    """Declared failed but still reaching the store (a partition): its writes, drops and restores
    are dropped, even for requests it still owns here; its checkpoints go to the live worker that
    touches them first (the driver's handover, relayed by the orchestrator, may come later)."""
    from tarragon.checkpoint_store import check_write, serve
    from tarragon.sockets import Received

    def received(sender: str, m: P.KVWrite, k: torch.Tensor) -> Received:  # as the store's socket gets it
        msg, bufs = P.decode(P.encode(m, k, -k))
        got = Received(sender, msg, bufs, sender.encode())
        check_write(got)
        return got

    store = CheckpointStore(1 << 20)
    m, k, _ = kv_write(0, [("a", 0, 2)])
    serve(store, received("aw0", m, k))
    store.fenced = {"aw0"}
    m, k, _ = kv_write(1, [("a", 2, 1)], finished=["a"])
    serve(store, received("aw0", m, k))
    serve(store, Received("aw0", P.RestoreRequest("a"), [], b"aw0"))
    assert store.restore("a")[0] == 2 and not store.parked  # neither extended nor dropped; no restore parked
    serve(store, Received("aw1", P.RestoreRequest("a"), [], b"aw1"))  # before its handover: the owner is fenced
    assert store.due_restores(0.0) == [(b"aw1", "a", True)]
    m, k, _ = kv_write(0, [("b", 0, 1)])
    serve(store, received("aw0", m, k))  # nor does it start new ones
    assert "b" not in store.requests
    m, k, _ = kv_write(0, [], finished=["a"])  # aw1 aborts it, its handover still on the way: dropped
    serve(store, received("aw1", m, k[:, :0]))
    assert store.requests == {} and store.bytes == 0


# ---- receiving, and the worker entry point ----------------------------------------------------


def test_recv_checks_tensor_frames_and_the_receivers_own_rule(tmp_path):
    """What every process receives goes through one helper: tensors are decoded against their
    header, the receiver's check applied; whatever fails is dropped (None), counted, never raised."""
    import zmq

    from tarragon.sockets import Context, drops, make_socket, recv

    ctx = Context(None)
    a = make_socket(ctx, zmq.ROUTER, bind=f"ipc://{tmp_path}/a.sock")
    b = make_socket(ctx, zmq.DEALER, connect=f"ipc://{tmp_path}/a.sock", identity="b")
    x = torch.arange(6, dtype=torch.float32).view(2, 3)

    def positive(got) -> None:
        if got.msg.call_id < 0:
            raise P.BadMessage("negative call id")

    try:
        before = drops.total
        b.send_multipart(P.encode(P.ExpertReply(1, P.TensorMeta("float32", [3, 3])), x))  # frame too short for its header
        b.send_multipart(P.encode(P.ExpertReply(-1, P.tensor_meta(x)), x))  # fails the receiver's rule
        b.send_multipart(P.encode(P.Pong(3)))  # not accepted on this socket
        b.send_multipart(P.encode(P.ExpertReply(2, P.tensor_meta(x)), x))
        got = [recv(a, (P.ExpertReply,), "test", check=positive) for _ in range(4)]
        assert got[:3] == [None, None, None] and drops.total == before + 3
        assert got[3].sender == "b" and got[3].msg.call_id == 2 and torch.equal(got[3].tensors[0], x)
    finally:
        a.close(0), b.close(0)
        ctx.term()


def test_a_frozen_heap_is_out_of_the_collectors_reach():
    """What each worker does once loaded (worker.loaded): its start-up objects leave the
    collector's generations, so no full collection walks them again in the middle of a step."""
    import gc

    from tarragon.worker import freeze_heap

    cycles = []
    for _ in range(1000):
        a: list = []
        a.append(a)
        cycles.append(a)
    before = gc.get_freeze_count()
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= before + len(cycles)
        assert not any(o is cycles for o in gc.get_objects(2))  # (nor in any generation: frozen)
    finally:
        gc.unfreeze()


def test_the_liveness_thread_beats_answers_probes_and_ends_on_a_shutdown(tmp_path):
    """A worker's liveness thread, against a stand-in orchestrator: it beats on its own channel,
    answers probes, ignores anything but a Shutdown there, and on a Shutdown calls its exit."""
    import threading

    import zmq

    from tarragon.sockets import Context, make_socket, recv
    from tarragon.worker import start_liveness

    ctx = Context(None)
    orch = make_socket(ctx, zmq.ROUTER, bind=f"ipc://{tmp_path}/orch.sock")
    told = threading.Event()
    thread = start_liveness(ctx, "ew9", f"ipc://{tmp_path}/probe.sock", f"ipc://{tmp_path}/orch.sock", 0.05, on_shutdown=told.set)
    prober = make_socket(ctx, zmq.DEALER, connect=f"ipc://{tmp_path}/probe.sock", identity="aw0")
    try:
        assert orch.poll(5000)
        beat = recv(orch, (P.Heartbeat,), "test")
        assert (beat.sender, beat.msg) == ("ew9#hb", P.Heartbeat("ew9"))
        prober.send_multipart(P.encode(P.Probe(7)))
        assert prober.poll(5000) and P.decode(prober.recv_multipart())[0] == P.Pong(7)
        orch.send_multipart([b"ew9#hb", *P.encode(P.Drain("ew9"))])  # not for a worker to obey
        orch.send_multipart([b"ew9#hb", *P.encode(P.Probe(1))])
        assert not told.wait(0.3) and thread.is_alive()
        orch.send_multipart([b"ew9#hb", *P.encode(P.Shutdown())])
        assert told.wait(5)
        thread.join(5)
        assert not thread.is_alive()
    finally:
        orch.close(0), prober.close(0)
        ctx.destroy(linger=0)


def test_every_worker_role_has_a_main():
    import inspect

    from tarragon.vocabulary import Role
    from tarragon.worker_main import ROLES, role_main

    assert set(ROLES) == set(Role) - {Role.ORCHESTRATOR}
    for role in ROLES:
        assert list(inspect.signature(role_main(role)).parameters) == ["spec", "ctx", "orch"]


def test_argmax_rows_is_torch_argmax_ties_included():
    """The chunked greedy pick returns torch's first index of the maximum: random rows, ties
    within and across chunks, a row of -inf but one, a vocabulary that is not chunked."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8192, generator=g)
    x[1, 100] = x[1, 5000] = 99.0  # tie across chunks
    x[2, 129] = x[2, 130] = 99.0  # tie within a chunk
    x[3] = float("-inf")
    x[3, 8191] = 0.0
    x[4] = 7.0  # every entry ties: index 0
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    odd = torch.randn(5, 1000, generator=g)  # not a multiple of the chunk: torch's own argmax
    assert torch.equal(argmax_rows(odd), odd.argmax(dim=-1))


@pytest.mark.parametrize("kernel", ["c", "onednn", "bf16"])
def test_packed_linear_equals_torch_and_does_not_depend_on_the_batch(kernel, monkeypatch):
    """Weights packed once at load (float32: for the C kernel of csrc/kernels.c, or oneDNN's where
    it is switched off; bf16: oneDNN's) give torch's F.linear (bf16: bit for bit, the same kernel;
    float32 to within rounding: another order of the sums), at sizes no multiple of the kernel's
    blocks, and a row's result does not depend on what it is batched with (a replayed row is
    bit-identical), nor, in C, on the number of threads."""
    from tarragon.kernels import SPLIT_COLUMNS, Linear, c_kernels, threads

    if kernel == "c" and c_kernels() is None:
        pytest.skip("no C compiler: the kernels are not built here")
    if kernel == "onednn":
        monkeypatch.setenv("TARRAGON_MATMUL_KERNEL", "torch")
    dtype = torch.bfloat16 if kernel == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    w, b = (torch.randn(96, 64, generator=g) * 0.1).to(dtype), (torch.randn(96, generator=g) * 0.1).to(dtype)
    x = torch.randn(16, 64, generator=g).to(dtype)
    lin = Linear(w, b)
    assert lin.c == (kernel == "c")
    y = lin(x)
    assert y.dtype == dtype
    assert torch.equal(lin(x[3:4]), y[3:4]) and torch.equal(lin(x[:5]), y[:5]) and torch.equal(lin(x.view(2, 8, 64)), y.view(2, 8, 96))
    ref = torch.nn.functional.linear(x, w, b)
    if dtype == torch.bfloat16 and lin.onednn:
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref)
    strided = torch.randn(16, 128, generator=g).to(dtype)[:, ::2]
    torch.testing.assert_close(lin(strided), torch.nn.functional.linear(strided, w, b))
    if kernel == "c":  # wide enough for two threads: the same bits as one
        wide = torch.randn(SPLIT_COLUMNS + 40, 64, generator=g)
        head = Linear(wide)
        with threads(2):
            two = head(x)
        with threads(1):
            assert torch.equal(head(x), two)
        torch.testing.assert_close(two, torch.nn.functional.linear(x, wide))
        pid = os.fork()  # a forked child has no helper thread: it must start its own, not wait forever
        if pid == 0:
            with threads(2):
                os._exit(0 if torch.equal(head(x), two) else 1)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    assert lin.nbytes == 96 * 64 * w.element_size()


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_expert_bank_equals_the_swiglu_formula_and_rows_do_not_depend_on_the_batch(tiny_models, monkeypatch, kernel):
    """An expert worker's bank, with the C expert kernel (csrc/kernels.c, built wherever there is
    a C compiler) or per-expert packed matmuls: each row is down(silu(gate x) * up x) of its
    own expert (the fused kernel to within 5e-5), and its result is bit-identical whether it runs alone, as an expert's only row,
    with other experts' rows, or on a worker holding only that expert of the layer (a replay
    reproduces the failure-free run)."""
    from tarragon.kernels import c_kernels
    from tarragon.model import ExpertBank
    from tarragon.weights import WeightFiles

    if kernel == "torch":
        monkeypatch.setenv("TARRAGON_MATMUL_KERNEL", "torch")
    elif c_kernels() is None:
        pytest.skip("no C compiler: the kernels are not built here")
    assert (c_kernels() is not None) == (kernel == "fused")
    model_dir = tiny_models["mixtral"]
    cfg = ModelConfig.from_dir(model_dir)
    layer = cfg.sparse_layers[1]
    with WeightFiles(model_dir) as f:
        bank = ExpertBank(cfg, f, [(layer, e) for e in range(cfg.num_experts)], torch.float32)
        alone = ExpertBank(cfg, f, [(layer, 5)], torch.float32)
        w = {n: [f.get(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{n}.weight", torch.float32) for e in range(cfg.num_experts)]
             for n in ("w1", "w2", "w3")}
    assert bool(bank.fused) == (kernel == "fused") and (layer, 5) in alone and (layer, 4) not in alone
    experts, counts = [0, 2, 5, 7], [1, 6, 2, 9]
    x = torch.randn(sum(counts), cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    first = bank.run(layer, 0, x[:2])
    y = bank.run_layer(layer, experts, counts, x)
    assert torch.equal(first[:1], y[:1])
    F = torch.nn.functional
    want = torch.cat([F.linear(F.silu(F.linear(x[s:s + n], w["w1"][e])) * F.linear(x[s:s + n], w["w3"][e]), w["w2"][e])
                      for e, n, s in zip(experts, counts, [0, 1, 7, 9])])
    # The fused kernel sums in another order than torch (measured: ~1e-6 on outputs of ~1).
    torch.testing.assert_close(y, want, atol=1e-5 if kernel == "torch" else 5e-5, rtol=1e-4)
    assert y.abs().max() > 0.3  # outputs of the size these tolerances are meant for
    for e, n, s in zip(experts, counts, [0, 1, 7, 9]):
        assert torch.equal(bank.run(layer, e, x[s:s + n]), y[s:s + n])
        assert all(torch.equal(bank.run(layer, e, x[r:r + 1])[0], y[r]) for r in range(s, s + n))
    assert torch.equal(alone.run(layer, 5, x[7:9]), y[7:9]) and torch.equal(alone.run(layer, 5, x[8:9])[0], y[8])
    assert bank.expert_nbytes((layer, 0)) == 3 * cfg.hidden_size * cfg.expert_intermediate_size * 4 == alone.nbytes

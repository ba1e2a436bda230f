"""Checkpoints survive the store: every attention worker writes each checkpoint to two stores, so
a store SIGKILLed and at once an attention worker still restores that worker's requests from
committed KV, and a replacement store is re-filled by the attention workers before it is needed."""

from __future__ import annotations

import time

import pytest

from failover import LOAD_PARAMS, LOAD_PROMPTS, LONG, assert_failure_free, restored_tokens, run_with_fault, wait_refilled, wait_until
from tarragon import LLM


def token_ids(outs):
    return [o.token_ids for o in outs]


def describe(llm) -> str:
    return "\n".join(f"{e.t:.2f} {e.kind} {e.worker} {e.detail[:90]}" for e in llm.events())


def stores(llm) -> list[str]:
    return sorted(w.name for w in llm.workers() if w.role == "store" and w.state == "ready")


def busy_attention_worker(llm) -> str:
    held = {r.worker for r in llm.in_flight()}
    return next(w.name for w in llm.workers() if w.role == "attention" and w.state == "ready" and w.name in held)


def healed(llm) -> None:
    """Back to two ready attention workers and two ready stores, every store empty once idle."""
    wait_until(lambda: sum(w.role == "attention" and w.state == "ready" for w in llm.workers()) == 2, 90, "two AWs")
    wait_until(lambda: len(stores(llm)) == 2, 90, "two stores")


@pytest.fixture(scope="module")
def cluster(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=2, stores=2) as llm:
        yield llm, llm.generate(LOAD_PROMPTS, LOAD_PARAMS)


def test_store_then_attention_worker_sigkill_restores_from_the_other_store(cluster):
    """SIGKILL a store, then at once (long before its replacement is up) a busy attention worker:
    its requests resume from the surviving store's committed KV, tokens as if nothing failed."""
    llm, baseline = cluster
    t0 = time.monotonic()
    victims = {}

    def inject():
        victims["store"], victims["aw"] = stores(llm)[0], busy_attention_worker(llm)
        llm.kill(victims["store"])
        llm.kill(victims["aw"])

    outs = run_with_fault(llm, inject, after_tokens=40)
    assert token_ids(outs) == token_ids(baseline)
    restored = restored_tokens(llm, t0)
    assert restored and all(n > 0 for n in restored), describe(llm)
    events = llm.events()
    last_restore = max(e.t for e in events if e.kind == "restored" and e.t > t0)
    store_back = [e.t for e in events if e.kind == "replacement_ready" and e.detail.endswith(f" {victims['store']}")]
    assert not store_back or store_back[0] > last_restore, "restored only once the store's replacement was up"
    healed(llm)


def test_replacement_stores_are_refilled_and_serve_restores(cluster):
    """A store killed twice in a row (its replacement too, once refilled): then the other store and
    an attention worker die together, and the twice-replaced store alone restores from committed KV.
    Once the requests end, no store holds any checkpoint (bytes bounded by what is held)."""
    llm, _ = cluster
    healed(llm)
    first, other = stores(llm)
    reqs = [llm.submit(p, LONG) for p in LOAD_PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 10, 60, "tokens")
    victim = first
    for _ in range(2):  # the store, then its replacement as soon as the AWs have refilled it
        t = time.monotonic()
        llm.kill(victim)
        wait_refilled(llm, reqs, t)
        victim = next(w for w in stores(llm) if w not in (first, other))
    t0 = time.monotonic()
    llm.kill(other)  # the only store that saw the requests from their start
    llm.kill(busy_attention_worker(llm))
    assert_failure_free(llm, reqs)
    restored = restored_tokens(llm, t0)
    assert restored and all(n > 0 for n in restored), describe(llm)
    healed(llm)

    def held() -> list[tuple[int, int]]:
        return [(w.info.get("requests", -1), w.info.get("bytes", -1)) for w in llm.workers() if w.role == "store" and w.state == "ready"]

    try:
        wait_until(lambda: held() == [(0, 0), (0, 0)], 10, "every checkpoint dropped at every store")
    except AssertionError:
        raise AssertionError(f"stores still hold (requests, bytes) {held()}:\n{describe(llm)}") from None


# ---- in one process: the attention worker's checkpointer against two stores' own code ---------


def test_checkpointer_restores_the_longest_prefix_and_skips_a_dead_store(tiny_models, tmp_path):
    """Writes reach every store; a restore takes the longest committed prefix, a store that held
    less then gets the installed KV, and a store whose channel dropped is not waited for."""
    import torch
    import zmq

    from tarragon import protocol as P
    from tarragon.checkpoint_store import FROM_ATTENTION, CheckpointStore, answer_restore, check_write, serve
    from tarragon.checkpointer import Checkpointer
    from tarragon.config import ModelConfig
    from tarragon.kv_cache import KVCache
    from tarragon.sampling import SamplingParams
    from tarragon.scheduler import Scheduler, Sequence
    from tarragon.sockets import Context, make_socket, recv

    cfg = ModelConfig.from_dir(tiny_models["mixtral"])
    kv = KVCache(cfg, 8, 4, torch.float32)
    kv.k.normal_(), kv.v.normal_()
    ctx = Context(None)
    ends = [f"ipc://{tmp_path}/s{i}.sock" for i in range(2)]
    socks = [make_socket(ctx, zmq.ROUTER, bind=e) for e in ends]
    stores = [CheckpointStore(1 << 30) for _ in ends]
    ck = Checkpointer(ctx, "aw0", ends, 64, kv, Scheduler(kv, 8, 64, 64, ()), lambda *a: None)

    def pump(i: int) -> None:  # store i serves what has arrived
        while not socks[i].closed and socks[i].poll(50):
            serve(stores[i], recv(socks[i], FROM_ATTENTION, f"s{i}", check=check_write))
        for who, req_id, allowed in stores[i].due_restores(time.monotonic()):
            answer_restore(stores[i], socks[i], who, req_id, allowed)

    def settled() -> list:
        done: list = []
        wait_until(lambda: pump(0) or pump(1) or done.extend(ck.receive(5.0)) or done, 5, "a settled restore")
        return done

    seq = Sequence("r", list(range(3, 13)), SamplingParams(max_tokens=4), output=[7])  # 11 tokens, 10 with KV
    kv.grow(seq.blocks, 10)
    held = list(seq.blocks)
    try:
        wait_until(lambda: ck.watch() or all(link.up for link in ck.links), 5, "both stores connected")
        ck.write(["r"], [0], [6], kv.slots(held, 0, 6), [])
        ck.write(["r"], [6], [3], kv.slots(held, 6, 9), [])
        pump(0), pump(1)
        _, k, v = stores[0].restore("r")  # store 0 keeps only 4 positions (as if its last writes were lost)
        stores[0].write("aw0", P.KVWrite(9, ["r"], [0], [4], P.tensor_meta(k[:, :4]), P.tensor_meta(v[:, :4]), []),
                        k[:, :4].clone(), v[:, :4].clone())
        assert [s.restore("r")[0] for s in stores] == [4, 9]
        ck.restore(seq)
        (r,) = settled()
        assert r.answers == {0: 4, 1: 9} and r.best[0].committed == 9
        assert torch.equal(r.best[1], kv.k.index_select(1, kv.slots(held, 0, 9)))
        seq.blocks, seq.num_computed = held, 9  # installed (what the AW does), then the copies completed
        ck.complete_copies(r)
        pump(0)
        assert stores[0].restore("r")[0] == 9
        socks[1].close(0)  # store 1 dies: the next restore asks store 0 only
        wait_until(lambda: ck.watch() or not ck.links[1].up, 5, "store 1 seen down")
        ck.restore(seq)
        assert ck.restoring["r"].waiting == {0}
        (r,) = settled()
        assert r.best[0].committed == 9 and r.answers == {0: 9}
    finally:
        for s in socks:
            s.close(0)
        for link in ck.links:
            link.sock.close(0)
            link.events.close(0)
        ctx.term()


def test_checkpointer_gathers_steps_into_one_write_per_interval(tiny_models, tmp_path):
    """Within its interval, steps' KV waits at the attention worker, copied as each step ends (its
    slots may be reused); the next write carries them all, in order."""
    import torch
    import zmq

    from tarragon.checkpoint_store import FROM_ATTENTION, CheckpointStore, check_write, serve
    from tarragon.checkpointer import Checkpointer
    from tarragon.config import ModelConfig
    from tarragon.kv_cache import KVCache
    from tarragon.scheduler import Scheduler
    from tarragon.sockets import Context, make_socket, recv

    cfg = ModelConfig.from_dir(tiny_models["mixtral"])
    kv = KVCache(cfg, 8, 4, torch.float32)
    kv.k.normal_(), kv.v.normal_()
    ctx = Context(None)
    end = f"ipc://{tmp_path}/s.sock"
    sock = make_socket(ctx, zmq.ROUTER, bind=end)
    store = CheckpointStore(1 << 30)
    ck = Checkpointer(ctx, "aw0", [end], 64, kv, Scheduler(kv, 8, 64, 64, ()), lambda *a: None, interval_s=60.0)
    seqs = {"a": [], "b": []}
    for req in seqs:
        assert kv.grow(seqs[req], 6)
    slots = {req: kv.slots(b, 0, 6) for req, b in seqs.items()}
    want = {req: (kv.k.index_select(1, s).clone(), kv.v.index_select(1, s).clone()) for req, s in slots.items()}

    def writes() -> int:
        n = 0
        while sock.poll(200):
            serve(store, recv(sock, FROM_ATTENTION, "s", check=check_write))
            n += 1
        return n

    try:
        wait_until(lambda: ck.watch() or ck.links[0].up, 5, "the store connected")
        ck.write(["a", "b"], [0, 0], [4, 4], torch.cat([slots["a"][:4], slots["b"][:4]]), [])  # the first write goes at once
        assert writes() == 1 and store.restore("a")[0] == store.restore("b")[0] == 4
        for pos in (4, 5):  # two decode steps: gathered
            ck.write(["a", "b"], [pos, pos], [1, 1], torch.stack([slots["a"][pos], slots["b"][pos]]), [])
        kv.k.zero_(), kv.v.zero_()  # their slots reused: what was gathered is a copy
        assert writes() == 0 and store.restore("a")[0] == 4
        ck.send_pending()  # (what the worker does when it goes idle, drains, or a request is aborted)
        assert writes() == 1  # one write, both steps
        for req, (k, v) in want.items():
            committed, rk, rv = store.restore(req)
            assert committed == 6 and torch.equal(rk, k) and torch.equal(rv, v)
        ck.write([], [], [], torch.empty(0, dtype=torch.long), ["a"])  # a request finished, no step: told when sent
        ck.send_pending()
        assert writes() == 1 and store.restore("a")[0] == 0 and store.restore("b")[0] == 6
    finally:
        sock.close(0)
        for link in ck.links:
            link.sock.close(0)
            link.events.close(0)
        ctx.term()

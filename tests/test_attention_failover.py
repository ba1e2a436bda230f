"""Attention-worker failures are survived: a dead worker's requests resume on healthy ones from
their checkpointed KV, and every client stream has the failure-free tokens, none lost or doubled."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from failover import LOAD_PARAMS, LOAD_PROMPTS, LONG, assert_failure_free, max_gap, restored_tokens, run_with_fault, wait_refilled, wait_until
from tarragon import LLM
from tarragon import protocol as P
from tarragon.checkpoint_store import CheckpointStore


def token_ids(outs):
    return [o.token_ids for o in outs]


def busy_attention_worker(llm) -> str:
    """A ready attention worker that holds unfinished requests."""
    held = {r.worker for r in llm.in_flight()}
    return next(w.name for w in llm.workers() if w.role == "attention" and w.state == "ready" and w.name in held)


def fault_and_report(llm, baseline, after_tokens: int, sig=signal.SIGKILL) -> dict:
    victim = {}

    def inject():
        victim["name"] = busy_attention_worker(llm)
        victim["reqs"] = {r.req_id for r in llm.in_flight() if r.worker == victim["name"]}
        llm.kill(victim["name"], sig)

    outs = run_with_fault(llm, inject, after_tokens=after_tokens)
    assert token_ids(outs) == token_ids(baseline)
    assert all(o.finish_reason == "length" and len(o.token_ids) == LOAD_PARAMS.max_tokens for o in outs)
    affected = [o for o in outs if o.request_id in victim["reqs"]]
    others = [o for o in outs if o.request_id not in victim["reqs"]]
    report = {"victim": victim["name"], "affected_stall_ms": 1000 * (max_gap(affected) - max_gap(baseline)),
              "unaffected_max_gap_ms": 1000 * max_gap(others) if others else None}
    print(f"\nkill {victim['name']} after {after_tokens} tokens: {report}")
    wait_until(lambda: sum(w.role == "attention" and w.state == "ready" for w in llm.workers()) >= 2, 90, "replacement AW")
    return report


@pytest.fixture(scope="module")
def cluster(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=2, recovery="tarragon") as llm:
        yield llm, llm.generate(LOAD_PROMPTS, LOAD_PARAMS)


@pytest.mark.parametrize("position", [10, 100, 180])
def test_sigkill_mid_decode_restores_from_checkpoints(cluster, position):
    llm, baseline = cluster
    fault_and_report(llm, baseline, position)
    restored = [e for e in llm.events() if e.kind == "restored"]
    assert restored and any(" 0 of " not in e.detail for e in restored)  # KV really came from the store


def test_sigkill_during_prefill(cluster):
    llm, baseline = cluster
    fault_and_report(llm, baseline, 0)


def test_sigstop_of_an_attention_worker(cluster):
    llm, baseline = cluster
    fault_and_report(llm, baseline, 60, sig=signal.SIGSTOP)
    # Seen by the driver's probes (it owes tokens; ~0.4 s), or by the orchestrator's heartbeats (1 s).
    assert any(e.kind == "worker_failed" and ("heartbeat" in e.detail or "probes" in e.detail) for e in llm.events())


def test_second_failure_during_restoration(tiny_models):
    with LLM(tiny_models["olmoe"], attention_workers=3, expert_workers=2) as llm:
        baseline = llm.generate(LOAD_PROMPTS, LOAD_PARAMS)

        def two_faults():
            llm.kill("aw0")
            wait_until(lambda: any(e.kind == "requests_reassigned" for e in llm.events()), 10, "reassignment")
            llm.kill("aw1")  # while aw0's requests are being restored onto it and aw2

        outs = run_with_fault(llm, two_faults, after_tokens=50)
        assert token_ids(outs) == token_ids(baseline)


def test_store_failure_then_attention_failure_restores_from_the_refilled_store(tiny_models):
    """One store: it is SIGKILLed, then an attention worker: its requests still restore from
    committed KV, since every attention worker writes its requests' whole KV to the new store."""
    with LLM(tiny_models["qwen3_moe"], attention_workers=2, expert_workers=2, stores=1) as llm:
        reqs = [llm.submit(p, LONG) for p in LOAD_PROMPTS]
        wait_until(lambda: min(len(r.tokens) for r in reqs) >= 10, 60, "tokens")
        t = time.monotonic()
        llm.kill("store")  # inference goes on; checkpoints wait for the new store
        wait_refilled(llm, reqs, t)
        t = time.monotonic()
        llm.kill(busy_attention_worker(llm))  # requests are packed on one AW where cores are few
        assert_failure_free(llm, reqs)
        restored = restored_tokens(llm, t)
        assert restored and all(n > 0 for n in restored), [(e.kind, e.worker, e.detail[:60]) for e in llm.events()]


@pytest.mark.parametrize("policy", ["recompute", "restart"])
def test_baseline_policies_give_the_same_tokens(tiny_models, policy):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=2, recovery=policy) as llm:
        baseline = llm.generate(LOAD_PROMPTS, LOAD_PARAMS)
        outs = run_with_fault(llm, lambda: llm.kill("aw0"), after_tokens=60)
        assert token_ids(outs) == token_ids(baseline)
        kinds = [e.kind for e in llm.events()]
        assert ("restart_started" in kinds) == (policy == "restart")
        assert "restored" not in kinds


def kv(layers: int, n: int, fill: float) -> torch.Tensor:
    return torch.full((layers, n, 2, 4), fill)


def write(store: CheckpointStore, seq: int, entries: list[tuple[str, int, int]], finished=(), owner="aw0"):
    total = sum(n for _, _, n in entries)
    k = torch.cat([kv(3, n, float(s)) for _, s, n in entries], dim=1) if entries else kv(3, 0, 0)
    msg = P.KVWrite(seq, [r for r, _, _ in entries], [s for _, s, _ in entries], [n for _, _, n in entries],
                    P.tensor_meta(k), P.tensor_meta(k), list(finished))
    assert k.shape[1] == total
    store.write(owner, msg, k, -k)


def test_checkpoint_store_commits_prefixes_and_collects_garbage():
    store = CheckpointStore(max_bytes=10_000)
    write(store, 0, [("a", 0, 5), ("b", 0, 3)])
    write(store, 1, [("a", 5, 1), ("b", 3, 1)])
    committed, k, v = store.restore("a")
    assert committed == 6 and k.shape == (3, 6, 2, 4) and torch.equal(v, -k)
    assert k[0, 5, 0, 0] == 5.0  # the second write's segment, appended after the first's
    write(store, 3, [("a", 7, 1)])  # write 2 was dropped: a hole, a stays at its prefix
    assert store.restore("a")[0] == 6 and store.gaps == 1 and store.refused == 1
    write(store, 4, [("b", 4, 1)], finished=["a"])
    assert store.restore("a")[0] == 0 and store.restore("b")[0] == 5 and store.stats()["requests"] == 1
    used = store.bytes
    write(store, 5, [("c", 0, 100)])  # over budget: refused, memory unchanged
    assert store.restore("c")[0] == 0 and store.bytes == used
    write(store, 6, [("b", 2, 1)])  # recomputed from position 2 (after a preemption): truncated
    assert store.restore("b")[0] == 3

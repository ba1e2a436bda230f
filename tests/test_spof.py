"""No single point of failure short of the driver, and no request that hangs: the driver's I/O
thread survives every handler error, requests end with an error when the cluster cannot serve
them, and a dead or hung orchestrator is replaced while the workers keep serving."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from failover import LOAD_PARAMS, LOAD_PROMPTS, max_gap, run_with_fault, wait_until
from tarragon import LLM, SamplingParams
from tarragon import protocol as P


def token_ids(outs):
    return [o.token_ids for o in outs]


def worker_pids(llm) -> dict[str, int]:
    return {w.name: w.pid for w in llm.workers() if w.role != "orchestrator" and w.state == "ready"}


@pytest.fixture(scope="module")
def cluster(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=2) as llm:
        yield llm, llm.generate(LOAD_PROMPTS, LOAD_PARAMS)


def test_io_thread_survives_handler_errors_and_bad_frames(cluster):
    llm, baseline = cluster
    reqs = [llm.submit(p, LOAD_PARAMS) for p in LOAD_PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 5, 60, "tokens")
    # One malformed PromptLogits frame from the very worker that serves the request (shape says
    # [len(prompt), vocab] fp32, the frame holds 3 bytes), handed to the I/O thread's handler.
    req = reqs[0]
    bad = P.encode(P.PromptLogits(req.req_id, P.TensorMeta("float32", [len(req.prompt_ids), llm.model_config.vocab_size])))
    llm._on_message(req.worker, [*bad, b"\x00\x01\x02"])
    assert req.prompt_logits is None
    # A handler that raises (once): the I/O thread logs it and goes on.
    real, calls = llm._on_cluster_state, []

    def broken(state):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected handler bug")
        return real(state)

    llm._on_cluster_state = broken
    try:
        wait_until(lambda: len(calls) >= 2, 10, "a ClusterState after the failing one")
    finally:
        del llm._on_cluster_state
    assert llm._io.is_alive()
    assert token_ids([llm.wait(r, 120) for r in reqs]) == token_ids(baseline)


def test_abort_racing_final_tokens(cluster):
    """abort() while the last token arrives (KeyError in the I/O thread, before)."""
    llm, _ = cluster
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for _ in range(4):
        reqs = [llm.submit(p, params) for p in LOAD_PROMPTS]
        for r in reqs:
            r.done.wait(0.002 * len(reqs))
            llm.abort(r)
    assert llm._io.is_alive()
    outs = llm.generate(LOAD_PROMPTS[:2], params, timeout=60)
    assert all(len(o.token_ids) == 2 for o in outs)


def test_orchestrator_sigkill_workers_keep_serving_and_a_successor_takes_over(cluster):
    llm, baseline = cluster
    before, old = worker_pids(llm), llm.workers()[0].pid
    outs = run_with_fault(llm, lambda: llm.kill("orchestrator"), after_tokens=40)
    assert token_ids(outs) == token_ids(baseline)
    assert max_gap(outs) < 1.0, f"streams stalled {max_gap(outs):.2f} s across the orchestrator's death"
    wait_until(lambda: llm.health()[0], 30, "a healthy cluster under a successor")
    assert llm.workers()[0].pid != old and llm.orchestrator_restarts >= 1
    assert {n: p for n, p in worker_pids(llm).items() if n in before} == before  # nobody restarted
    assert any(e.kind == "orchestrator_replaced" for e in llm.events())
    # The successor detects and replaces failures: an attention worker killed under load.
    outs = run_with_fault(llm, lambda: llm.kill("aw0"), after_tokens=30)
    assert token_ids(outs) == token_ids(baseline)
    kinds = [(e.kind, e.worker) for e in llm.events()]
    assert ("worker_failed", "aw0") in kinds and any(k == "replacement_started" for k, _ in kinds)
    wait_until(lambda: sum(w.role == "attention" and w.state == "ready" for w in llm.workers()) == 2, 60, "a new AW")


def test_orchestrator_sigstop_is_detected_fenced_and_replaced(cluster):
    llm, baseline = cluster
    old = llm.workers()[0].pid
    seen: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            ok, why = llm.health()
            if not ok and (not seen or seen[-1] != why):
                seen.append(why)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        outs = run_with_fault(llm, lambda: llm.kill("orchestrator", signal.SIGSTOP), after_tokens=40)
        wait_until(lambda: llm.workers()[0].pid != old and llm.health()[0], 30, "a successor")
    finally:
        stop.set()
        watcher.join()
    assert token_ids(outs) == token_ids(baseline)
    assert max_gap(outs) < 1.0
    assert any("orchestrator" in why for why in seen), seen  # /health said so while it was hung
    assert not llm.workers()[0].alive or llm.workers()[0].pid != old


def test_two_attention_workers_dying_together(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=3, expert_workers=2) as llm:
        baseline = llm.generate(LOAD_PROMPTS, LOAD_PARAMS)

        def two():
            llm.kill("aw0")
            llm.kill("aw1")

        outs = run_with_fault(llm, two, after_tokens=30)
        assert llm._io.is_alive()
        assert token_ids(outs) == token_ids(baseline)


def test_requests_end_with_an_error_when_the_cluster_cannot_serve(tiny_models):
    """The only attention worker dies and none replaces it: /health turns unhealthy once no token
    has come for progress_timeout_s, every request ends with an error after stall_timeout_s, new
    ones are refused, and shutdown returns."""
    llm = LLM(tiny_models["mixtral"], attention_workers=1, expert_workers=1, replace_failed=False,
              progress_timeout_s=1.0, stall_timeout_s=3.0)
    try:
        params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        reqs = [llm.submit(p, params) for p in LOAD_PROMPTS[:4]]
        wait_until(lambda: min(len(r.tokens) for r in reqs) >= 3, 60, "tokens")
        llm.kill("aw0")
        t0 = time.monotonic()
        wait_until(lambda: not llm.health()[0] and "no token" in llm.health()[1], 10, "unhealthy")
        assert not llm.accepting()[0]
        outs = [llm.wait(r, 15) for r in reqs]
        assert all(o.finish_reason == "error" and "no token" in o.error for o in outs)
        assert time.monotonic() - t0 < 10
    finally:
        t = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - t < 20


def test_an_llm_made_on_a_thread_that_exits_keeps_its_cluster(tiny_models):
    """PR_SET_PDEATHSIG fires when the *thread* that forked a child exits."""
    box = []
    t = threading.Thread(target=lambda: box.append(LLM(tiny_models["mixtral"], attention_workers=1, expert_workers=1)))
    t.start()
    t.join(120)
    llm = box[0]
    try:
        time.sleep(0.5)
        assert all(w.alive for w in llm.workers()), [(w.name, w.alive) for w in llm.workers()]
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0), timeout=60)
        assert len(out[0].token_ids) == 4 and llm.orchestrator_restarts == 0
    finally:
        llm.shutdown()


def test_shutdown_returns_with_a_hung_orchestrator(tiny_models):
    llm = LLM(tiny_models["mixtral"], attention_workers=1, expert_workers=1, orchestrator_timeout_s=60)
    pids = [w.pid for w in llm.workers()]
    req = llm.submit([5, 6, 7], SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True))
    llm.kill("orchestrator", signal.SIGSTOP)
    t = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - t < 20
    assert req.done.is_set() and req.finish_reason in ("error", "length")
    from test_processes import pid_alive

    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "every process gone")

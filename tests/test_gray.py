"""Gray failures and planned drains: a worker that still answers, but far slower than its peers,
is treated as failing (and a machine slowed down as a whole fails nobody: timeouts adapt); a
worker drained on purpose (LLM.drain, SIGTERM, POST /tarragon/drain) leaves without a stall."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import prompts_of_lengths
from failover import LOAD_PARAMS, LOAD_PROMPTS, LONG, assert_failure_free, max_gap, run_with_fault, wait_replaced, wait_until
from tarragon import LLM, SamplingParams
from tarragon.timeouts import GRAY_SUSTAIN_S, GRAY_WINDOW_S, K, MAX_AGE_S, AdaptiveTimeout, GrayDetector, runnable


def token_ids(outs):
    return [o.token_ids for o in outs]


def describe(llm) -> str:
    return "\n".join(f"{e.t:.2f} {e.kind} {e.worker} {e.detail} {e.ms:.0f}" for e in llm.events())


def failures(llm) -> list:
    return [e for e in llm.events() if e.kind == "worker_failed"]


@pytest.fixture(scope="module")
def cluster(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=3, shadows=1, placement="spread") as llm:
        yield llm, llm.generate(LOAD_PROMPTS, LOAD_PARAMS)


def test_runnable_tells_a_starved_process_from_a_stopped_one():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        wait_until(lambda: runnable(busy.pid), 5, "the busy loop running")
        time.sleep(0.2)
        assert not runnable(idle.pid)
        busy.send_signal(signal.SIGSTOP)
        wait_until(lambda: not runnable(busy.pid), 5, "the stop")
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
    assert not runnable(busy.pid)


def test_adaptive_timeout_and_gray_detector():
    t = AdaptiveTimeout(0.1, 2.0)
    for _ in range(100):
        t.observe(0.002)
    assert t.value == 0.1  # quiet machine: the floor
    for _ in range(100):
        t.observe(0.2)
    assert t.value == pytest.approx(K * 0.2)  # slow machine: K x its round trips
    for _ in range(300):
        t.observe(5.0)
    assert t.value == 2.0  # capped
    t.samples = type(t.samples)([(time.monotonic() - MAX_AGE_S - 1, s) for _, s in t.samples], maxlen=t.samples.maxlen)
    assert t.value == 0.1  # the load went away: samples age out, back to the floor
    g, now = GrayDetector(), 0.0
    for i in range(200):  # all three slowed alike: no outlier
        now += 0.01
        for w in ("a", "b", "c"):
            g.observe(w, 0.05, now)
    assert g.slow(now) == []
    start, seen = now, []
    for _ in range(200):  # one of them 10x slower, for 2 s
        now += 0.01
        g.observe("a", 0.5, now)
        g.observe("b", 0.05, now)
        if not seen and (seen := g.slow(now)):
            assert [w for w, _ in seen] == ["a"] and "gray failure" in seen[0][1]
            assert GRAY_SUSTAIN_S <= now - start < GRAY_WINDOW_S + GRAY_SUSTAIN_S + 0.2  # sustained, then at once
    assert seen


def hog_every_core() -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]


def test_a_machine_slowed_down_as_a_whole_fails_no_worker(cluster):
    """A busy-looping process per core, at the workers' priority, during generation."""
    llm, baseline = cluster
    before = len(failures(llm))
    hogs = hog_every_core()
    try:
        t0 = time.monotonic()
        outs = run_with_fault(llm, lambda: None, after_tokens=0)
        took = time.monotonic() - t0
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    print(f"\nunder a CPU hog per core: {took:.1f} s for the load, largest gap {max_gap(outs) * 1000:.0f} ms")
    assert token_ids(outs) == token_ids(baseline)
    assert len(failures(llm)) == before, describe(llm)


class Cycler(threading.Thread):
    """SIGSTOP / SIGCONT a process: stopped `stop_s`, running `run_s`, until told or it is gone."""

    def __init__(self, pid: int, stop_s: float = 0.08, run_s: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.stop_s, self.run_s = pid, stop_s, run_s
        self.done = threading.Event()
        self.t0 = 0.0

    def run(self) -> None:
        self.t0 = time.monotonic()
        try:
            while not self.done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(self.stop_s)
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(self.run_s)
        except ProcessLookupError:  # fenced (SIGKILL) by the orchestrator
            pass

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_a_cycled_expert_worker_is_caught_as_a_gray_failure(cluster):
    """Stopped 80 ms of every 100 ms: it answers every probe in time, yet is 5x+ slower than its peers."""
    llm, _ = cluster
    victim = next(w for w in llm.workers() if w.role == "expert" and w.state == "ready")
    reqs = [llm.submit(p, LONG) for p in LOAD_PROMPTS]  # still running when it is caught
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 20, 60, "tokens")
    cycler = Cycler(victim.pid)
    cycler.start()
    try:
        wait_until(lambda: any(e.worker == victim.name for e in failures(llm)), 30, f"{victim.name} declared failed")
    finally:
        cycler.stop()
    assert_failure_free(llm, reqs)
    failed = [e for e in failures(llm) if e.worker == victim.name]
    assert failed and "gray failure" in failed[0].detail, describe(llm)
    detected = failed[0].t - cycler.t0
    print(f"\ncycled {victim.name}: failed {detected:.2f} s after the cycling began: {failed[0].detail}")
    assert detected < 5.0
    wait_replaced(llm, victim.name)


def test_a_cycled_expert_worker_serving_a_split_batch_is_caught(tiny_models):
    """Packed, 50 requests run split and every expert call goes to ew0 (see the packed placement):
    ew1 idles, so the attention worker has no peer to compare ew0's reply times with. Cycled,
    ew0 is caught all the same (by its late heartbeats: the orchestrator's test, against ew1's);
    its calls move to ew1's copies with the failure-free tokens."""
    prompts = prompts_of_lengths([3 + i % 9 for i in range(50)], 1024, seed=5)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    with LLM(tiny_models["mixtral"], attention_workers=1, expert_workers=2, placement="pack") as llm:
        baseline = llm.generate(prompts, params)
        cycler = Cycler(next(w.pid for w in llm.workers() if w.name == "ew0"))
        try:
            outs = run_with_fault(llm, cycler.start, after_tokens=20, prompts=prompts, params=params)
        finally:
            cycler.stop()
        assert token_ids(outs) == token_ids(baseline)
        failed = [e for e in failures(llm) if e.worker == "ew0"]
        assert failed and "gray failure" in failed[0].detail, describe(llm)
        print(f"\ncycled ew0 (split, preferred): failed {failed[0].t - cycler.t0:.2f} s after the cycling began: {failed[0].detail}")
        assert failed[0].t - cycler.t0 < 5.0


def test_a_cycled_attention_worker_is_caught_by_its_late_heartbeats(cluster):
    """The busy attention worker, cycled: the orchestrator sees its heartbeats come late while its
    peers' do not; its requests move (restored from the store) with the failure-free tokens."""
    llm, _ = cluster
    reqs = [llm.submit(p, LONG) for p in LOAD_PROMPTS]  # still running when it is caught (200 tokens ended before, now and then)
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 20, 60, "tokens")
    victim = reqs[0].worker
    cycler = Cycler(next(w.pid for w in llm.workers() if w.name == victim))
    cycler.start()
    try:
        wait_until(lambda: any(e.worker == victim for e in failures(llm)), 30, f"{victim} declared failed")
    finally:
        cycler.stop()
    assert_failure_free(llm, reqs)
    assert all(r.worker != victim for r in reqs)  # moved, and their tokens are those of a failure-free run
    failed = [e for e in failures(llm) if e.worker == victim]
    assert failed and "gray failure: heartbeats late" in failed[0].detail, describe(llm)
    print(f"\ncycled {victim}: failed {failed[0].t - cycler.t0:.2f} s after the cycling began: {failed[0].detail}")
    assert failed[0].t - cycler.t0 < 5.0
    wait_replaced(llm, victim)


def drained(llm, name: str) -> list:
    return [e for e in llm.events() if e.kind == "worker_drained" and e.worker == name]


def check_drain(llm, baseline, outs, name: str, pid: int) -> float:
    """Tokens as without the drain, the worker exited by itself (status 0), no failure; the stall."""
    assert token_ids(outs) == token_ids(baseline)
    wait_until(lambda: drained(llm, name), 20, f"{name} drained")
    assert drained(llm, name)[0].detail.endswith("exited (0)"), describe(llm)
    assert not any(e.worker == name for e in failures(llm)), describe(llm)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, f"{name}'s process gone")
    gap = max_gap(outs)
    print(f"\ndrain of {name}: largest token gap {gap * 1000:.0f} ms (failure-free run: {max_gap(baseline) * 1000:.0f} ms)")
    return gap


def test_drain_an_attention_worker_mid_generation(cluster):
    """Its requests move through the store: resumed elsewhere from committed KV, none recomputed."""
    llm, baseline = cluster
    reqs = [llm.submit(p, LOAD_PARAMS) for p in LOAD_PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 40, 60, "tokens before the drain")
    victim = reqs[0].worker
    pid = next(w.pid for w in llm.workers() if w.name == victim)
    restored, recomputed = llm.reassigned["restored"], llm.reassigned["recomputed"]
    moved = sum(r.worker == victim for r in reqs)
    llm.drain(victim)
    outs = [llm.wait(r, 120) for r in reqs]
    gap = check_drain(llm, baseline, outs, victim, pid)
    assert llm.reassigned["restored"] - restored == moved and llm.reassigned["recomputed"] == recomputed
    assert gap < 1.0
    wait_replaced(llm, victim)


def test_sigterm_drains_an_expert_worker_mid_generation(cluster):
    """SIGTERM (a preemption notice): its shadows take its calls at once, then it exits."""
    llm, baseline = cluster
    victim = next(w for w in llm.workers() if w.role == "expert" and w.state == "ready")
    outs = run_with_fault(llm, lambda: os.kill(victim.pid, signal.SIGTERM), after_tokens=40)
    gap = check_drain(llm, baseline, outs, victim.name, victim.pid)
    assert any(e.kind == "drain_started" and e.worker == victim.name and e.detail == "SIGTERM" for e in llm.events())
    assert gap < 1.0
    wait_replaced(llm, victim.name)
    assert token_ids(llm.generate(LOAD_PROMPTS[:4], LOAD_PARAMS)) == token_ids(baseline[:4])


def test_drain_endpoint_is_opt_in_and_behind_the_api_key(cluster):
    from test_server import Server

    llm, _ = cluster
    plain = Server(llm)
    try:
        assert httpx.post(f"{plain.url}/tarragon/drain", json={"worker": "ew0"}).status_code == 404
    finally:
        plain.stop()
    srv = Server(llm, api_key="k", admin=True)
    try:
        url, auth = f"{srv.url}/tarragon/drain", {"authorization": "Bearer k"}
        assert httpx.post(url, json={"worker": "ew0"}).status_code == 401
        assert httpx.post(url, json={"worker": "nobody"}, headers=auth).status_code == 409
        assert httpx.post(url, json={"name": "ew0"}, headers=auth).status_code == 400
        victim = next(w for w in llm.workers() if w.role == "expert" and w.state == "ready")
        r = httpx.post(url, json={"worker": victim.name}, headers=auth)
        assert r.status_code == 200 and r.json()["draining"]
        wait_until(lambda: drained(llm, victim.name), 20, f"{victim.name} drained")
        wait_replaced(llm, victim.name)
    finally:
        srv.stop()

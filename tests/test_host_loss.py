"""Hosts that vanish: every worker on a network host of its own (a namespace on a bridge, see
netns.py), joined by hand over TCP with the cluster key, the driver and the orchestrator on the
bridge. A host's link is cut silently (no FIN, no RST), partitioned, healed. Outputs must match
the failure-free run token for token, and the stall stay under a second."""

from __future__ import annotations

import json
import signal
import os
import subprocess
import socket
import sys
import time
from pathlib import Path

import pytest

import netns
from failover import LOAD_PARAMS, LOAD_PROMPTS, LONG, wait_replaced, wait_until
from tarragon import LLM
from tarragon.sockets import ClusterKey

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=f"network hosts: {netns.available()}")

PROMPTS, PARAMS = LOAD_PROMPTS[:6], LOAD_PARAMS
# Only the store's loss waits for it (AWs and EWs are probed): 3 s, not the default 1 s, since on
# two cores shared with other jobs healthy expert workers missed 1 s of heartbeats (fenced, with no
# spare to replace them: the module's later cases hung).
HEARTBEAT_TIMEOUT_S = float(os.environ.get("HOST_LOSS_HEARTBEAT_TIMEOUT_S", "3.0"))


class Hosts:
    """A cluster whose workers each run on a host of their own; `host_of[name]` once joined."""

    def __init__(self, net: netns.Net, tmp_path: Path):
        self.net, self.tmp = net, tmp_path
        self.key_file = tmp_path / "cluster.key"
        ClusterKey.generate().save(self.key_file)
        with socket.socket() as s:
            s.bind((netns.DRIVER_IP, 0))
            self.address = f"tcp://{netns.DRIVER_IP}:{s.getsockname()[1]}"
        self.free = list(net.hosts)
        self.logs: dict[str, Path] = {}  # host -> its worker's log

    def start(self, role: str) -> str:
        """A worker offering itself for `role` on the next free host; returns the host."""
        h = self.free.pop(0)
        self.logs[h] = self.tmp / f"{h}-{role}.log"
        with open(self.logs[h], "wb") as log:
            self.net.popen(h, [sys.executable, "-m", "tarragon", "worker", "--role", role, "--join", self.address,
                               "--key-file", str(self.key_file), "--timeout", "120"], stdout=log, stderr=log)
        return h

    def host_of(self, name: str) -> str:
        return next(h for h, log in self.logs.items() if f"joined as {name}," in log.read_text())


RESULTS: dict[str, dict] = {}  # case -> figures, written to docs/results/host_loss.json by bench/host_loss.py


@pytest.fixture(scope="module", autouse=True)
def figures():
    """bench/host_loss.py sets HOST_LOSS_RESULTS: the figures of every case go there as JSON."""
    yield
    if os.environ.get("HOST_LOSS_RESULTS"):
        Path(os.environ["HOST_LOSS_RESULTS"]).write_text(json.dumps(RESULTS, indent=1) + "\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_models):
    """One cluster for the module (start-up is the slow part): a store, two expert workers, two
    attention workers, each on its own host, and eight free hosts for spares that join later."""
    with netns.Net(13) as net:
        hosts = Hosts(net, tmp_path_factory.mktemp("hosts"))
        for role in ("store", "expert", "expert", "attention", "attention"):
            hosts.start(role)
        with LLM(tiny_models["olmoe"], attention_workers=2, expert_workers=2, launcher="manual", join_address=hosts.address,
                 key_file=str(hosts.key_file), placement="spread", stall_timeout_s=30,
                 heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, log_dir=hosts.tmp / "driver-logs") as llm:
            yield hosts, llm, [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


def cut_during_load(hosts: Hosts, llm: LLM, name: str, case: str, heal_after_s: float = 0.0) -> list:
    """Cut `name`'s host once every stream has 40 tokens; returns the outputs, records figures."""
    reqs = [llm.submit(p, PARAMS) for p in PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 40, 60, "tokens before the cut")
    host = hosts.host_of(name)
    t0 = time.monotonic()
    hosts.net.cut(host)
    if heal_after_s:
        time.sleep(heal_after_s)
        hosts.net.heal(host)
    outs = [llm.wait(r, 60) for r in reqs]
    failed: list = []
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S + 5  # the store is judged by heartbeats only: it may come after the outputs
    while not failed and time.monotonic() < deadline:
        failed = [e for e in llm.events() if e.kind == "worker_failed" and e.worker == name]
        time.sleep(0.1)
    gap = max(max((b - a for a, b in zip(o.token_times, o.token_times[1:]) if b > t0), default=0.0) for o in outs)
    RESULTS[case] = {"worker": name, "detected_s": round(failed[0].t - t0, 3) if failed else None,
                     "how": failed[0].detail if failed else "not declared failed", "stall_s": round(gap, 3)}
    print(f"{case}: {RESULTS[case]}")
    return outs


def test_attention_host_cut_moves_its_requests(cluster):
    hosts, llm, baseline = cluster
    spare = hosts.start("attention")  # joins in the failed one's place
    restored = llm.reassigned["restored"]
    outs = cut_during_load(hosts, llm, "aw0", "attention host cut")
    assert [o.token_ids for o in outs] == baseline
    assert llm.reassigned["restored"] > restored  # from the store, not recomputed
    assert RESULTS["attention host cut"]["detected_s"] is not None
    assert RESULTS["attention host cut"]["stall_s"] < 1.0
    new = wait_replaced(llm, "aw0")
    assert hosts.host_of(new) == spare
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == baseline


def test_expert_host_cut_is_masked(cluster):
    hosts, llm, baseline = cluster
    spare = hosts.start("expert")
    outs = cut_during_load(hosts, llm, "ew0", "expert host cut")
    assert [o.token_ids for o in outs] == baseline
    assert RESULTS["expert host cut"]["stall_s"] < 1.0
    assert hosts.host_of(wait_replaced(llm, "ew0")) == spare
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == baseline


def test_a_cut_attention_worker_that_comes_back_stays_fenced(cluster):
    """Its link heals seconds after it was fenced: what it sent meanwhile is dropped, it never
    delivers a token again (no duplicate), and it is told to shut down, and does."""
    hosts, llm, baseline = cluster
    name = next(w.name for w in llm.workers() if w.role == "attention" and w.state == "ready")
    host = hosts.host_of(name)
    proc = next(p for p in hosts.net.procs if p.args[3] == hosts.net.ns(host))
    hosts.start("attention")
    outs = cut_during_load(hosts, llm, name, "attention host cut, healed after 3 s", heal_after_s=3.0)
    assert [o.token_ids for o in outs] == baseline  # a token delivered twice would show here
    # Told to shut down once its link came back: within seconds, each reconnection attempt being
    # cut short (sockets.ZMQ_CONNECT_TIMEOUT_MS); left to TCP's SYN backoff it took over 60 s in
    # whole-suite runs. The bound is generous: the machine is shared.
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:  # (rare in whole-suite runs, never alone: its log says why)
        said = "\n".join(line for line in llm.client.launcher.log_tail("orchestrator", 10_000).splitlines() if name in line)
        pytest.fail(f"the fenced {name} still runs 60 s after its link healed; its log ends:\n{hosts.logs[host].read_text()[-4000:]}\n"
                    f"the orchestrator's log on it:\n{said[-4000:]}")
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == baseline


def test_store_host_cut_does_not_stall_and_a_store_joins_elsewhere(cluster):
    """The store's host is lost: no stall (checkpoints are off the token path); a spare store on
    another host takes its slot, the attention workers re-point their link to its address, re-fill
    it with every request's KV and write to it from then on; a later restore reads from it."""
    hosts, llm, baseline = cluster
    spare = hosts.start("store")
    outs = cut_during_load(hosts, llm, "store", "store host cut")
    assert [o.token_ids for o in outs] == baseline
    assert RESULTS["store host cut"]["detected_s"] is not None
    assert RESULTS["store host cut"]["stall_s"] < 1.0
    new = wait_replaced(llm, "store")
    assert hosts.host_of(new) == spare
    reqs = [llm.submit(p, PARAMS) for p in PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 40, 60, "tokens")
    held = lambda: next((w.info.get("positions", 0) for w in llm.workers() if w.name == new), 0)  # noqa: E731
    wait_until(lambda: held() > 0, 30, "checkpoints on the new store")
    hosts.start("attention")
    t0 = time.monotonic()
    hosts.net.cut(hosts.host_of(reqs[0].worker))
    assert [llm.wait(r, 60).token_ids for r in reqs] == baseline
    assert any(e.kind == "restored" and e.restored_tokens > 0 for e in llm.events() if e.t > t0)  # KV from the new store


def test_an_attention_worker_cut_off_from_the_experts_is_fenced_not_them(cluster):
    """A partition between one attention worker and both expert workers (the driver and the
    orchestrator still reach all three): the attention worker loses every expert on its side, but
    they still beat, so it is the one fenced; its requests move, the experts keep serving."""
    hosts, llm, baseline = cluster
    experts = [w.name for w in llm.workers() if w.role == "expert" and w.state == "ready"]
    hosts.start("attention")
    wait_until(lambda: sum(w.role == "attention" and w.state == "ready" for w in llm.workers()) >= 2, 60,
               "two attention workers (a spare may still be joining)")
    reqs = [llm.submit(p, PARAMS) for p in PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 40, 60, "tokens before the partition")
    name = reqs[0].worker
    t0 = time.monotonic()
    for ew in experts:
        hosts.net.partition(hosts.host_of(name), hosts.host_of(ew))
    outs = [llm.wait(r, 60) for r in reqs]
    hosts.net.heal(hosts.host_of(name))
    failed = [e for e in llm.events() if e.kind == "worker_failed" and e.t > t0]
    gap = max(max((b - a for a, b in zip(o.token_times, o.token_times[1:]) if b > t0), default=0.0) for o in outs)
    RESULTS["attention cut off from the experts"] = {"worker": name, "detected_s": round(failed[0].t - t0, 3) if failed else None,
                                                      "how": failed[0].detail if failed else "", "stall_s": round(gap, 3)}
    print(RESULTS["attention cut off from the experts"])
    assert [o.token_ids for o in outs] == baseline
    assert [e.worker for e in failed] == [name]  # the experts were not fenced
    assert gap < 1.0


def test_an_attention_worker_cut_off_from_the_driver_is_fenced_and_stays_so(cluster):
    """The reverse partition: one attention worker loses the driver and the orchestrator (one host)
    but still reaches the experts (and the store, if one is up). Its requests move to the other
    attention worker; the experts, told it is fenced, drop its calls, so it computes nothing more
    (a long request it holds shows it); when the link heals it is told to shut down: no token is
    delivered twice."""
    hosts, llm, baseline = cluster
    hosts.start("attention")
    wait_until(lambda: sum(w.role == "attention" and w.state == "ready" for w in llm.workers()) >= 2, 60,
               "two attention workers (a spare may still be joining)")
    moved = sum(llm.reassigned.values())
    long = llm.submit(PROMPTS[0], LONG)  # still decoding on the isolated worker when it is fenced
    reqs = [llm.submit(p, PARAMS) for p in PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 40, 60, "tokens before the partition")
    name = long.worker
    host = hosts.host_of(name)
    experts = [hosts.host_of(w.name) for w in llm.workers() if w.role == "expert" and w.state == "ready"]
    proc = next(p for p in hosts.net.procs if p.args[3] == hosts.net.ns(host))
    t0 = time.monotonic()
    hosts.net.partition(host, "driver")
    outs = [llm.wait(r, 60) for r in reqs]
    failed = [e for e in llm.events() if e.kind == "worker_failed" and e.t > t0]
    gap = max(max((b - a for a, b in zip(o.token_times, o.token_times[1:]) if b > t0), default=0.0) for o in outs)
    RESULTS["attention cut off from the driver"] = {"worker": name, "detected_s": round(failed[0].t - t0, 3) if failed else None,
                                                     "how": failed[0].detail if failed else "", "stall_s": round(gap, 3)}
    print(RESULTS["attention cut off from the driver"])
    # The fenced worker's first dropped call leaves it waiting for that answer, so only the experts
    # that call went to see it: both, or one (with one request left, a token's top-2 experts are
    # both on one expert worker 3 times in 7); the suite once saw one.
    refused = f"dropping calls from {name}: fenced"
    wait_until(lambda: any(refused in hosts.logs[h].read_text() for h in experts), 10, "an expert refusing the fenced worker")
    hosts.net.heal(host)
    llm.abort(long)
    assert [o.token_ids for o in outs] == baseline  # a token delivered twice would show here
    assert [e.worker for e in failed] == [name], failed  # the experts and the store were not fenced
    assert sum(llm.reassigned.values()) > moved
    assert gap < 1.0
    healed = time.monotonic()
    assert proc.wait(60) is not None  # told to shut down once its link came back (see above)
    print(f"healed, fenced {name} shut down {time.monotonic() - healed:.1f} s after the heal")
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == baseline


def test_a_silent_orchestrator_is_replaced_and_its_successor_runs_the_joined_workers(cluster):
    """The orchestrator goes silent (SIGSTOP: no FIN, as when its host vanishes) while every worker
    is on another host: streams go on (the datapath does not pass through it), the driver fences
    it after `orchestrator_timeout_s` and starts a successor at the same address, which adopts the
    joined workers by their endpoints; it then handles an expert host's loss, and a spare joins it."""
    hosts, llm, baseline = cluster
    restarts = llm.orchestrator_restarts
    reqs = [llm.submit(p, PARAMS) for p in PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 40, 60, "tokens before the orchestrator stops")
    t0 = time.monotonic()
    llm.kill("orchestrator", signal.SIGSTOP)
    outs = [llm.wait(r, 60) for r in reqs]
    gap = max(max((b - a for a, b in zip(o.token_times, o.token_times[1:]) if b > t0), default=0.0) for o in outs)
    assert [o.token_ids for o in outs] == baseline
    assert gap < 1.0
    wait_until(lambda: llm.orchestrator_restarts > restarts and llm.health()[0], 30, "a successor")
    adopted = next(e for e in llm.events() if e.kind == "orchestrator_replaced")
    RESULTS["orchestrator silent (SIGSTOP)"] = {"worker": "orchestrator", "detected_s": round(adopted.t - t0, 3),
                                                "how": f"successor up: {adopted.detail}", "stall_s": round(gap, 3)}
    print(RESULTS["orchestrator silent (SIGSTOP)"])
    victim = next(w.name for w in llm.workers() if w.role == "expert" and w.state == "ready")
    assert victim in adopted.detail
    spare = hosts.start("expert")
    outs = cut_during_load(hosts, llm, victim, "expert host cut, under a successor orchestrator")
    assert [o.token_ids for o in outs] == baseline
    try:
        new = wait_replaced(llm, victim)
    except AssertionError:  # (once in a whole-suite run, never alone: the spare's log and the orchestrator's say why)
        orch_log = llm.client.launcher.log_tail("orchestrator", 10_000).splitlines()
        pytest.fail(f"no replacement of {victim}; the spare's log ends:\n{hosts.logs[spare].read_text()[-3000:]}\n"
                    f"the orchestrator's log ends:\n" + "\n".join(orch_log[-40:]))
    assert hosts.host_of(new) == spare
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == baseline

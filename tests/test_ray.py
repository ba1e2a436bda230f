"""Many machines: workers as Ray actors on two logical nodes (one Ray cluster for the session), and
workers started by hand that join a cluster. Failures are real signals; outputs must match the
failure-free run token for token."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from failover import LOAD_PARAMS, LOAD_PROMPTS, run_with_fault, wait_replaced, wait_until
from tarragon import LLM
from tarragon.sockets import ClusterKey

ray = pytest.importorskip("ray")

# Two logical nodes on this host, each named by a custom resource only it "has".
NODES = {"store": "node_a", "ew0": "node_a", "ew1": "node_b", "ew2": "node_b", "aw0": "node_a", "aw1": "node_b"}


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=16, resources={"node_a": 8, "node_b": 8}, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=3, shadows=1, launcher="ray", nodes=NODES) as llm:
        yield llm, llm.generate(LOAD_PROMPTS, LOAD_PARAMS)


def token_ids(outs):
    return [o.token_ids for o in outs]


def placed_by_ray(llm, name: str) -> dict:
    """What Ray itself says about a worker's actor: its pid and the resources it holds."""
    actor = ray.get_actor(name, namespace=llm.run_dir.name)
    return ray.get(actor.info.remote(), timeout=30)


def assert_on_node(llm, name: str, node: str) -> None:
    info = placed_by_ray(llm, name)
    assert info["pid"] == next(w.pid for w in llm.workers() if w.name == name)
    assert node in info["resources"] and info["endpoint"].startswith("tcp://127.0.0.1:")


def test_shadows_and_actors_follow_the_nodes(cluster):
    llm, _ = cluster
    for row in llm.plan.candidates:
        for primary, *shadows in row:
            assert shadows and all(NODES[s] != NODES[primary] for s in shadows)  # never on its primary's node
    for name, node in NODES.items():
        assert_on_node(llm, name, node)


def test_expert_actor_sigkill(cluster):
    llm, baseline = cluster
    outs = run_with_fault(llm, lambda: llm.kill("ew1"), after_tokens=50)
    assert token_ids(outs) == token_ids(baseline)
    assert_on_node(llm, wait_replaced(llm, "ew1"), NODES["ew1"])  # Ray put the replacement where ew1 was


def test_attention_actor_sigkill(cluster):
    llm, baseline = cluster
    victim = {}

    def kill_a_busy_attention_worker():
        victim["name"] = next(iter({r.worker for r in llm.in_flight()}))
        llm.kill(victim["name"])

    outs = run_with_fault(llm, kill_a_busy_attention_worker, after_tokens=50)
    assert token_ids(outs) == token_ids(baseline)
    assert any(e.kind == "restored" and " 0 of " not in e.detail for e in llm.events())
    assert_on_node(llm, wait_replaced(llm, victim["name"]), NODES[victim["name"]])


def test_actors_die_with_their_orchestrator(cluster):
    """Ray's owner fate-sharing: the orchestrator created the actors, they die with it."""
    llm, _ = cluster
    assert sum(w.alive for w in llm.workers()) == 1 + len(NODES)
    os.kill(llm.orchestrator_pid, signal.SIGKILL)
    wait_until(lambda: not any(w.alive for w in llm.workers()), 30, "the actors' exit")


def test_workers_that_join_by_hand(tiny_models, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    procs: list[tuple[subprocess.Popen, Path]] = []
    key_file = tmp_path / "cluster.key"
    ClusterKey.generate().save(key_file)  # what `serve --launcher manual --key-file F` writes; copied to each host

    def start(role: str) -> None:  # as one would on another host, or in a Kubernetes pod
        path = tmp_path / f"{role}{len(procs)}.log"
        with open(path, "wb") as log:
            procs.append((subprocess.Popen([sys.executable, "-m", "tarragon", "worker", "--role", role, "--join", address,
                                            "--key-file", str(key_file), "--timeout", "120"], stdout=log, stderr=subprocess.STDOUT), path))

    def joined_as(name: str) -> subprocess.Popen:  # the process that says it serves as `name`
        return next(p for p, log in procs if f"joined as {name}," in log.read_text())

    prompts, params = LOAD_PROMPTS[:6], LOAD_PARAMS
    try:
        for role in ("store", "expert", "expert", "attention"):  # before the cluster listens: they wait
            start(role)
        with LLM(tiny_models["olmoe"], attention_workers=1, expert_workers=2, launcher="manual", join_address=address,
                 key_file=str(key_file)) as llm:
            assert all(w.pid == 0 for w in llm.workers() if w.role != "orchestrator")  # a joiner's claimed pid: never used
            baseline = llm.generate(prompts, params)
            killed = joined_as("ew0")
            outs = run_with_fault(llm, killed.kill, after_tokens=40, prompts=prompts, params=params)  # on "its host"
            assert token_ids(outs) == token_ids(baseline)
            start("expert")  # fills the slot ew0 left
            new = wait_replaced(llm, "ew0")
            assert joined_as(new) is procs[-1][0]
            assert token_ids(llm.generate(prompts, params)) == token_ids(baseline)
        assert all(p.wait(15) == 0 for p, _ in procs if p is not killed)  # told to shut down, they did
    finally:
        for p, _ in procs:
            p.kill()
            p.wait()

"""The orchestrator's decisions in-process, with a launcher that starts nothing: what it does when
a worker falls silent, when an attention worker reports an expert worker lost (a stopped worker,
a partition, a pause), and under the `restart` policy. Workers' messages are handed to it as its
socket would; what it sends is recorded. (The same decisions against real processes, SIGKILLed
and SIGSTOPped: test_expert_failover, test_attention_failover, test_gray, test_host_loss.)"""

from __future__ import annotations

import collections
import os

import pytest

from tarragon import protocol as P
from tarragon.config import ClusterConfig, ModelSource, ResilienceConfig, TarragonConfig
from tarragon.launcher import LocalLauncher
from tarragon.orchestrator import ClusterSpec, Orchestrator
from tarragon.shadow_placement import place
from tarragon.sockets import Received
from tarragon.vocabulary import EventKind, RecoveryPolicy, Role, WorkerState
from tarragon.worker import WorkerSpec

HB = 0.05  # heartbeat period


class NoProcess:
    """The WorkerHandle of a worker that is never started: alive until killed."""

    pid = 0  # no such process: never taken for a starved one

    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode or 0


class RecordingLauncher(LocalLauncher):
    """Addresses as the local launcher gives them; starting a worker records its spec."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.started: list[WorkerSpec] = []

    def start_worker(self, spec: WorkerSpec, node: str = "") -> NoProcess:
        self.started.append(spec)
        return NoProcess()


@pytest.fixture
def orch(tmp_path, request):
    """2 attention workers, 2 expert workers (4 experts, one shadow each), 1 store, all ready."""
    recovery = getattr(request, "param", RecoveryPolicy.TARRAGON)
    config = TarragonConfig(ModelSource(""), resilience=ResilienceConfig(stores=1, heartbeat_s=HB, heartbeat_timeout_s=0.5, recovery=recovery),
                            cluster=ClusterConfig(attention_workers=2, insecure_transport=True))
    spec = ClusterSpec(config=config, plan=place(4, [0], ["ew0", "ew1"], shadows=1), run_dir=str(tmp_path),
                       driver_endpoint=f"ipc://{tmp_path}/driver.sock", parent_pid=os.getpid())
    o = Orchestrator(spec, RecordingLauncher(str(tmp_path)))
    o.sent = []
    o.send = lambda name, msg: o.sent.append((name, msg))
    try:
        o.start_all()
        for name in list(o.workers):
            say(o, name, P.Ready(name, o.workers[name].role, 0))
        assert all(w.state == WorkerState.READY for w in o.workers.values())
        o.sent.clear()
        yield o
    finally:
        o.ctx.destroy(linger=0)


def say(o: Orchestrator, name: str, msg: P.Msg) -> None:
    """`msg` from worker `name`, as its socket delivers it (heartbeats on their own channel)."""
    o.on_worker(Received(f"{name}#hb" if isinstance(msg, P.Heartbeat) else name, msg, []))


def events(o: Orchestrator, kind: EventKind) -> list[P.Event]:
    return [e for e in o.events if e.kind == kind]


def owners(o: Orchestrator) -> list[str | None]:
    """Who serves each expert of layer 0 in the last routing table pushed to aw0."""
    tables = [m.table for name, m in o.sent if name == "aw0" and isinstance(m, P.TableUpdate)]
    return tables[-1].owners(0)


def test_a_silent_worker_is_failed_replaced_and_routed_around(orch):
    o = orch
    assert o.table().owners(0) == ["ew0", "ew0", "ew1", "ew1"]
    o.workers["ew0"].last_beat -= 1.0  # silent past the heartbeat timeout (0.5 s); the others beat
    for name in o.workers:
        if name != "ew0":
            say(o, name, P.Heartbeat(name))
    o.check_liveness()
    ew0 = o.workers["ew0"]
    assert ew0.state == WorkerState.FAILED and ew0.proc.returncode == -9  # fenced
    assert [e.worker for e in events(o, EventKind.WORKER_FAILED)] == ["ew0"]
    assert "no heartbeat" in events(o, EventKind.WORKER_FAILED)[0].detail
    new = o.launcher.started[-1]
    assert (new.name, new.role, new.nice) == ("ew2", Role.EXPERT, 10) and o.workers["ew2"].slot == "ew0"
    assert new.experts == o.plan.experts_of("ew0")  # it loads what ew0 held, shadows included
    assert owners(o) == ["ew1", "ew1", "ew1", "ew1"]  # its experts moved to their shadows
    assert {name for name, m in o.sent if isinstance(m, P.TableUpdate)} == {"aw0", "aw1"}
    say(o, "ew0", P.Heartbeat("ew0"))  # fenced: heard again, told to go (on both its channels)
    assert ("ew0", P.Shutdown()) in o.sent and ("ew0#hb", P.Shutdown()) in o.sent and ew0.state == WorkerState.FAILED
    say(o, "ew2", P.Ready("ew2", Role.EXPERT, 0))
    assert owners(o) == ["ew2", "ew2", "ew1", "ew1"]  # the replacement takes its slot back
    assert [e.worker for e in events(o, EventKind.REPLACEMENT_READY)] == ["ew2"]


def test_a_stopped_expert_worker_reported_by_an_attention_worker_is_failed(orch):
    o = orch
    say(o, "aw0", P.WorkerFailed("ew0", "aw0", "no reply and no answer to probes", 120.0))
    t = o.suspicions["ew0"][0]
    o.judge_suspicions(t + 3 * HB)
    assert o.workers["ew0"].state == WorkerState.READY  # weighed against its heartbeats first
    o.judge_suspicions(t + 7 * HB)  # none came
    assert o.workers["ew0"].state == WorkerState.FAILED and o.workers["aw0"].state == WorkerState.READY
    failed = events(o, EventKind.WORKER_FAILED)
    assert [(e.worker, e.ms) for e in failed] == [("ew0", 120.0)] and "reported by aw0" in failed[0].detail
    assert owners(o) == ["ew1", "ew1", "ew1", "ew1"]


def test_a_partition_fences_the_attention_worker_cut_off(orch):
    """The reported expert worker beats on: the reporter is cut off from it, not it from all."""
    o = orch
    say(o, "aw0", P.WorkerFailed("ew0", "aw0", "channel disconnected", 5.0))
    t = o.suspicions["ew0"][0]
    o.workers["ew0"].last_beat = t + 4 * HB
    o.judge_suspicions(t + 4 * HB)
    assert o.workers["ew0"].state == WorkerState.READY and o.workers["aw0"].state == WorkerState.FAILED
    assert "cut off from ew0, which is alive" in events(o, EventKind.WORKER_FAILED)[0].detail
    new = o.launcher.started[-1]
    assert new.role == Role.ATTENTION and o.workers[new.name].slot == "aw0"
    # Cut off from the experts, it may still reach the store (and, partitioned the other way, the
    # experts): both are told to drop whatever it sends; an expert worker that comes up later too.
    assert {name for name, m in o.sent if m == P.Fence(["aw0"])} == {"ew0", "ew1", "store"}
    o.sent.clear()
    o.workers["ew1"].state = WorkerState.STARTING  # as if it were just starting: its first Ready
    say(o, "ew1", P.Ready("ew1", Role.EXPERT, 0))
    assert o.sent == [("ew1", P.Fence(["aw0"]))]
    assert o.spec.fenced == [] and o.fenced == collections.deque(["aw0"])  # published, for a successor


def test_an_expert_worker_every_attention_worker_lost_is_failed_though_it_beats(orch):
    o = orch
    for aw in ("aw0", "aw1"):
        say(o, aw, P.WorkerFailed("ew0", aw, "channel disconnected", 5.0))
    t = o.suspicions["ew0"][0]
    o.workers["ew0"].last_beat = t + 4 * HB
    o.judge_suspicions(t + 4 * HB)
    assert o.workers["ew0"].state == WorkerState.FAILED
    assert {o.workers[aw].state for aw in ("aw0", "aw1")} == {WorkerState.READY}
    assert "unreachable from every attention worker" in events(o, EventKind.WORKER_FAILED)[0].detail


def test_a_paused_expert_worker_is_failed_not_its_reporter(orch):
    """Its heartbeats stopped here too around the report (SIGSTOP, then SIGCONT): no partition."""
    o = orch
    o.workers["ew0"].last_beat -= 3 * HB
    say(o, "aw0", P.WorkerFailed("ew0", "aw0", "no reply and no answer to probes", 110.0))
    t = o.suspicions["ew0"][0]
    o.workers["ew0"].last_beat = t + 4 * HB  # it beats again once resumed
    o.judge_suspicions(t + 4 * HB)
    assert o.workers["ew0"].state == WorkerState.FAILED and o.workers["aw0"].state == WorkerState.READY
    assert "heartbeats stopped too" in events(o, EventKind.WORKER_FAILED)[0].detail


def test_a_report_from_a_worker_about_another_role_or_under_another_name_is_ignored(orch):
    o = orch
    say(o, "aw0", P.WorkerFailed("aw1", "aw0", "forged", 1.0))  # AWs' evidence is about expert workers
    say(o, "aw1", P.WorkerFailed("ew0", "aw0", "forged", 1.0))  # aw1 speaking for aw0
    say(o, "ew1", P.WorkerFailed("ew0", "ew1", "forged", 1.0))  # an expert worker reporting
    assert not o.suspicions and not events(o, EventKind.WORKER_FAILED)


@pytest.mark.parametrize("orch", [RecoveryPolicy.RESTART], indirect=True)
def test_the_restart_policy_replaces_every_worker(orch):
    o = orch
    before = list(o.workers.values())
    o.workers["ew1"].last_beat -= 1.0
    o.check_liveness()
    assert all(w.proc.returncode == -9 for w in before)
    assert o.epoch == 1 and sorted(o.workers) == ["aw0-r1", "aw1-r1", "ew0-r1", "ew1-r1", "store-r1"]
    assert [e.kind for e in o.events if e.kind != EventKind.ROUTING_UPDATED][-2:] == [EventKind.WORKER_FAILED,
                                                                                         EventKind.RESTART_STARTED]
    for name in o.workers:
        assert not events(o, EventKind.RESTART_READY)  # (it was logged at once, before anything started)
        say(o, name, P.Ready(name, o.workers[name].role, 0))
    assert len(events(o, EventKind.RESTART_READY)) == 1


def test_a_drained_expert_worker_leaves_the_table_first_and_exits_when_told(orch):
    o = orch
    say(o, "ew0", P.Drain("ew0"))  # it got SIGTERM
    ew0 = o.workers["ew0"]
    assert ew0.state == WorkerState.DRAINING and owners(o) == ["ew1", "ew1", "ew1", "ew1"]  # its shadows serve at once
    assert o.launcher.started[-1].name == "ew2" and o.workers["ew2"].slot == "ew0"
    o.check_drain(ew0, ew0.stop_at)  # after its grace period, it is told to go
    assert ("ew0", P.Shutdown()) in o.sent and ew0.proc.returncode is None
    ew0.proc.returncode = 0  # it exits
    o.check_drain(ew0, ew0.stop_at + 0.1)
    assert ew0.state == WorkerState.STOPPED and not events(o, EventKind.WORKER_FAILED)
    assert [e.worker for e in events(o, EventKind.WORKER_DRAINED)] == ["ew0"]


def test_a_drained_attention_worker_is_asked_to_hand_its_requests_back_and_a_store_is_not_drained(orch):
    o = orch
    o.on_driver(P.Drain("aw1"))
    assert ("aw1", P.Drain("aw1")) in o.sent and o.workers["aw1"].state == WorkerState.DRAINING
    assert not o.workers["aw1"].stop_at  # until the driver has moved its requests
    o.on_driver(P.Drained("aw1"))
    assert o.workers["aw1"].stop_at
    o.on_driver(P.Drain("store"))
    assert o.workers["store"].state == WorkerState.READY and events(o, EventKind.DRAIN_REFUSED)

"""The forwarding engine against scripted expert workers, over both datapaths (a local link, and
ZeroMQ over tcp:// as to another host): a hung worker is probed, failed and replayed around; its
late answer is never applied."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

from failover import wait_until
from tarragon import local_link
from tarragon import protocol as P
from tarragon.forwarding_engine import ForwardingEngine
from tarragon.model import MoECall
from tarragon.procfs import CpuDemand
from tarragon.routing_table import RoutingTable
from tarragon.sockets import ClusterKey, Context, make_socket, recv


class ZmqEnd:
    """A scripted expert worker's datapath end (or a probe or orchestrator socket): a ROUTER."""

    def __init__(self, ctx: Context, endpoint: str):
        self.sock = make_socket(ctx, zmq.ROUTER, bind=endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms))

    def recv(self) -> tuple[bytes, P.Msg, list]:
        frames = self.sock.recv_multipart()
        return (frames[0], *P.decode(frames[1:]))

    def send(self, ident: bytes, frames: list) -> None:
        self.sock.send_multipart([ident, *frames])

    def close(self) -> None:
        self.sock.close(0)


class LinkEnd:
    """The same, as an expert worker on this host listens: local links."""

    def __init__(self, endpoint: str):
        self.endpoint, self.poller, self.inbox = endpoint, zmq.Poller(), []
        self.listener = local_link.Listener(endpoint, self.poller, "fake")

    def poll(self, timeout_ms: int) -> bool:
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.inbox:
            events = dict(self.poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            self.inbox += [(m.identity, m.msg, m.bufs) for m in self.listener.receive(events, (P.ExpertRequest,), None)]
            if time.monotonic() >= deadline:
                break
        return bool(self.inbox)

    def recv(self) -> tuple[bytes, P.Msg, list]:
        while not self.poll(1000):
            pass
        return self.inbox.pop(0)

    def send(self, ident: bytes, frames: list) -> None:
        self.listener.send(ident, frames)
        self.poll(0)  # (what the socket did not take at once goes out when it is writable)

    def close(self) -> None:
        self.listener.close()


def fakes(ctx: Context, tmp_path, transport: str, names: tuple[str, ...]) -> dict:
    """Scripted ends: expert workers' datapaths over `transport`, the rest ZMQ ROUTERs on ipc."""
    out = {}
    for name in names:
        if name.startswith("ew") and "-" not in name:
            out[name] = LinkEnd(f"ipc://{tmp_path}/{name}.sock") if transport == "link" else ZmqEnd(ctx, "tcp://127.0.0.1:*")
        else:
            out[name] = ZmqEnd(ctx, f"ipc://{tmp_path}/{name}.sock")
    return out


@pytest.mark.parametrize("transport", ["link", "tcp"])
def test_silent_worker_is_failed_and_its_calls_replayed(tmp_path, transport):
    ctx = Context(ClusterKey.generate())
    fake = fakes(ctx, tmp_path, transport, ("ew0", "ew1", "ew0-probe", "ew1-probe", "orch"))
    ep = {name: f.endpoint for name, f in fake.items()}
    orch = make_socket(ctx, zmq.DEALER, connect=ep["orch"], identity="aw0")
    table = RoutingTable(0, 2, [0], [[["ew0", "ew1"], ["ew1", "ew0"]]])  # expert 0: primary ew0, shadow ew1
    engine = ForwardingEngine("aw0", table, {"ew0": ep["ew0"], "ew1": ep["ew1"]}, ctx, {"ew0": ep["ew0-probe"], "ew1": ep["ew1-probe"]},
                              lambda msg: orch.send_multipart(P.encode(msg)), probe_interval_s=0.01, probe_timeout_s=0.03)
    hidden = torch.randn(3, 8)
    call = MoECall(0, hidden, torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), 0.5))
    result = {}
    waiter = threading.Thread(target=lambda: result.update(out=engine.dispatch(call).result()))
    waiter.start()
    try:
        aw0, req, _ = fake["ew0"].recv()  # ew0 gets the call and never answers, nor its probes
        assert isinstance(req, P.ExpertRequest) and not req.replay
        assert fake["ew1"].poll(5000), "the call was not replayed to the shadow"
        ident, replay, bufs = fake["ew1"].recv()
        assert replay.replay and replay.experts == [0] and replay.counts == [3]
        rows = P.to_tensor(replay.hidden, memoryview(bufs[0]))
        assert torch.equal(rows, hidden)  # the very same hidden states
        fake["ew1"].send(ident, P.encode(P.ExpertReply(replay.call_id, P.tensor_meta(rows)), rows * 2))
        late = torch.full_like(rows, 999.0)  # ew0 wakes up and answers after all
        fake["ew0"].send(aw0, P.encode(P.ExpertReply(req.call_id, P.tensor_meta(late)), late))
        waiter.join(5)
        assert not waiter.is_alive()
        torch.testing.assert_close(result["out"], hidden * 2 * 0.5)
        assert fake["orch"].poll(1000)
        _, report, _ = fake["orch"].recv()
        assert isinstance(report, P.WorkerFailed) and report.worker == "ew0" and "probes" in report.reason
        assert fake["ew0-probe"].poll(0), "ew0 was never probed"
        assert engine.replayed == 1
    finally:
        engine.close()
        orch.close(0)
        for s in fake.values():
            s.close()
        ctx.term()


@pytest.mark.parametrize("transport", ["link", "tcp"])
def test_a_wait_wakes_on_the_control_channel_for_a_table_and_a_shutdown(tmp_path, transport):
    """A call with no live copy of its expert is held until the attention worker (here: its
    control handler) applies a routing table that names one; a shutdown ends a wait at once."""
    ctx = Context(None)
    fake = fakes(ctx, tmp_path, transport, ("ew1", "ew1-probe", "orch"))
    ep = {name: f.endpoint for name, f in fake.items()}
    control = make_socket(ctx, zmq.DEALER, connect=ep["orch"], identity="aw0")
    engine = ForwardingEngine("aw0", RoutingTable(0, 1, [0], [[[]]]), {}, ctx, {}, lambda msg: None,
                              probe_interval_s=0.01, probe_timeout_s=5.0)
    seen = []

    def on_control() -> bool:  # what the attention worker's on_control does
        got = recv(control, (P.TableUpdate, P.Shutdown), "aw0 (orchestrator)")
        seen.append(type(got.msg).__name__)
        if isinstance(got.msg, P.TableUpdate):
            engine.apply_update(got.msg)
        return not isinstance(got.msg, P.Shutdown)

    engine.wake_on(control, on_control)
    hidden = torch.randn(2, 8)
    result = {}

    def call() -> None:
        future = engine.dispatch(MoECall(0, hidden, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)))
        result["out"] = future.result()

    try:
        control.send(b"")  # the orchestrator learns of aw0 (before the waiting thread owns the socket)
        assert fake["orch"].poll(2000)
        aw0 = fake["orch"].sock.recv_multipart()[0]
        waiter = threading.Thread(target=call)
        waiter.start()
        assert not fake["ew1"].poll(200), "nothing to send to before the table names a worker"
        update = P.TableUpdate(RoutingTable(1, 1, [0], [[["ew1"]]]), {"ew1": ep["ew1"]}, {"ew1": ep["ew1-probe"]})
        fake["orch"].send(aw0, P.encode(update))
        assert fake["ew1"].poll(5000), "the held call was not sent once the table named ew1"
        ident, req, bufs = fake["ew1"].recv()
        rows = P.to_tensor(req.hidden, memoryview(bufs[0]))
        fake["ew1"].send(ident, P.encode(P.ExpertReply(req.call_id, P.tensor_meta(rows)), rows * 3))
        waiter.join(5)
        torch.testing.assert_close(result["out"], hidden * 3)
        waiter = threading.Thread(target=call)  # ew1 gets this one and never answers (its probes neither)
        waiter.start()
        assert fake["ew1"].poll(5000)
        fake["orch"].send(aw0, P.encode(P.Shutdown()))
        waiter.join(2)
        assert not waiter.is_alive() and result["out"] is None and seen == ["TableUpdate", "Shutdown"]
    finally:
        engine.close()
        control.close(0)
        for s in fake.values():
            s.close()
        ctx.term()


def test_cpu_demand_sees_tasks_waiting_for_a_cpu():
    """The polling wait's gate (ForwardingEngine.wait): with more busy processes than CPUs, none
    is spare; once they end, one is again."""
    demand = CpuDemand()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(demand.cpus + 1)]
    try:
        wait_until(lambda: not demand.spare(), 10, "the busy processes counted")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    wait_until(demand.spare, 10, "a spare CPU once they ended")

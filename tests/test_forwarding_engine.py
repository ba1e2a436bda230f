"""The forwarding engine against scripted expert workers: a hung worker is probed, failed and
replayed around; its late answer is never applied."""

from __future__ import annotations

import threading

import torch
import zmq

from tarragon import protocol as P
from tarragon.forwarding_engine import ForwardingEngine
from tarragon.model import MoECall
from tarragon.routing_table import RoutingTable
from tarragon.sockets import ClusterKey, Context, make_socket, recv


def test_silent_worker_is_failed_and_its_calls_replayed(tmp_path):
    ctx = Context(ClusterKey.generate())
    ep = {w: f"ipc://{tmp_path}/{w}.sock" for w in ("ew0", "ew1", "ew0-probe", "ew1-probe", "orch")}
    fake = {name: make_socket(ctx, zmq.ROUTER, bind=ep[name]) for name in ep}
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
        first = fake["ew0"].recv_multipart()  # ew0 gets the call and never answers, nor its probes
        req, _ = P.decode(first[1:])
        assert isinstance(req, P.ExpertRequest) and not req.replay
        assert fake["ew1"].poll(5000), "the call was not replayed to the shadow"
        frames = fake["ew1"].recv_multipart()
        replay, bufs = P.decode(frames[1:])
        assert replay.replay and replay.experts == [0] and replay.counts == [3]
        rows = P.to_tensor(replay.hidden, memoryview(bufs[0]))
        assert torch.equal(rows, hidden)  # the very same hidden states
        fake["ew1"].send_multipart([frames[0], *P.encode(P.ExpertReply(replay.call_id, P.tensor_meta(rows)), rows * 2)])
        late = torch.full_like(rows, 999.0)  # ew0 wakes up and answers after all
        fake["ew0"].send_multipart([first[0], *P.encode(P.ExpertReply(req.call_id, P.tensor_meta(late)), late)])
        waiter.join(5)
        assert not waiter.is_alive()
        torch.testing.assert_close(result["out"], hidden * 2 * 0.5)
        assert fake["orch"].poll(1000)
        report, _ = P.decode(fake["orch"].recv_multipart()[1:])
        assert isinstance(report, P.WorkerFailed) and report.worker == "ew0" and "probes" in report.reason
        assert fake["ew0-probe"].poll(0), "ew0 was never probed"
        assert engine.replayed == 1
    finally:
        engine.close()
        orch.close(0)
        for s in fake.values():
            s.close(0)
        ctx.term()


def test_a_wait_wakes_on_the_control_channel_for_a_table_and_a_shutdown(tmp_path):
    """A call with no live copy of its expert is held until the attention worker (here: its
    control handler) applies a routing table that names one; a shutdown ends a wait at once."""
    ctx = Context(None)
    ep = {w: f"ipc://{tmp_path}/{w}.sock" for w in ("ew1", "ew1-probe", "orch")}
    fake = {name: make_socket(ctx, zmq.ROUTER, bind=ep[name]) for name in ep}
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
        aw0 = fake["orch"].recv_multipart()[0]
        waiter = threading.Thread(target=call)
        waiter.start()
        assert not fake["ew1"].poll(200), "nothing to send to before the table names a worker"
        update = P.TableUpdate(RoutingTable(1, 1, [0], [[["ew1"]]]), {"ew1": ep["ew1"]}, {"ew1": ep["ew1-probe"]})
        fake["orch"].send_multipart([aw0, *P.encode(update)])
        assert fake["ew1"].poll(5000), "the held call was not sent once the table named ew1"
        frames = fake["ew1"].recv_multipart()
        req, bufs = P.decode(frames[1:])
        rows = P.to_tensor(req.hidden, memoryview(bufs[0]))
        fake["ew1"].send_multipart([frames[0], *P.encode(P.ExpertReply(req.call_id, P.tensor_meta(rows)), rows * 3)])
        waiter.join(5)
        torch.testing.assert_close(result["out"], hidden * 3)
        waiter = threading.Thread(target=call)  # ew1 gets this one and never answers (its probes neither)
        waiter.start()
        assert fake["ew1"].poll(5000)
        fake["orch"].send_multipart([aw0, *P.encode(P.Shutdown())])
        waiter.join(2)
        assert not waiter.is_alive() and result["out"] is None and seen == ["TableUpdate", "Shutdown"]
    finally:
        engine.close()
        control.close(0)
        for s in fake.values():
            s.close(0)
        ctx.term()

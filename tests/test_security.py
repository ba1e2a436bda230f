"""Only the cluster's own processes may speak on its sockets, and every receiver checks who speaks.

One local cluster (ipc:// in a 0700 run folder) for: other users locked out, forged messages from
peers that can connect, dead workers that try to come back, size limits, rate-limited drop logs
and a wire fuzz. One manual cluster (tcp:// with CURVE) for: clients without the key, or with a
wrong one, get nothing from the join socket, the store or an expert worker's datapath.
Every test ends by checking that the cluster still gives the failure-free tokens."""

from __future__ import annotations

import os
import random
import re
import socket
import stat
import struct
import subprocess
import sys
import time

import msgspec
import pytest
import torch
import zmq

from failover import run_with_fault, wait_replaced, wait_until
from conftest import prompts_of_lengths
from link_client import LinkClient
from tarragon import LLM, SamplingParams
from tarragon import protocol as P
from tarragon.routing_table import RoutingTable
from tarragon.sockets import CONTROL_MAX_BYTES, ClusterKey

PROMPTS = prompts_of_lengths([5, 9, 14, 7, 11, 6], 1024, seed=3)
PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
HIDDEN = 64  # the tiny models' hidden size


def token_ids(outs):
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def cluster(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=2) as llm:
        yield llm, token_ids(llm.generate(PROMPTS, PARAMS))


@pytest.fixture(autouse=True)
def close_peers():
    """Every Peer a test made is closed after it, also when it failed: a Context that the garbage
    collector finds later, its socket's weak reference already cleared, blocks in term() (it
    hung a later test once)."""
    yield
    while OPEN_PEERS:
        OPEN_PEERS.pop().close()


class Peer:
    """A raw ZMQ client of the test's own: plain (ipc), or with CURVE keys (tcp)."""

    def __init__(self, endpoint: str, identity: str, server_key: str | None = None, key: ClusterKey | None = None):
        self.ctx = zmq.Context()
        OPEN_PEERS.append(self)
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.setsockopt(zmq.IDENTITY, identity.encode())
        if server_key:
            key = key or ClusterKey.generate()
            self.s.curve_serverkey, self.s.curve_publickey, self.s.curve_secretkey = (
                server_key.encode(), key.public.encode(), key.secret.encode())
        self.s.connect(endpoint)

    def send(self, msg: P.Msg, *tensors) -> "Peer":
        self.s.send_multipart(P.encode(msg, *tensors))
        return self

    def reply(self, timeout_s: float = 1.0):
        return P.decode(self.s.recv_multipart())[0] if self.s.poll(timeout_s * 1000) else None

    def close(self) -> None:
        if not self.ctx.closed:
            self.ctx.destroy(0)


OPEN_PEERS: list[Peer] = []


def expert_request() -> tuple[P.ExpertRequest, torch.Tensor]:
    x = torch.randn(3, HIDDEN)
    return P.ExpertRequest(7, 0, [0], [3], P.tensor_meta(x)), x


def live_request_ids(llm) -> list[str]:
    return [r.req_id for r in llm.in_flight()]


# ---- the local cluster (ipc://) --------------------------------------------------------------


def test_other_users_cannot_reach_the_ipc_sockets(cluster):
    """The run folder is 0700 and the key 0600; a process of another user reaches no socket (here
    an expert worker's local link), while the same client run as this user is answered (so the
    check can fail)."""
    llm, _ = cluster
    run_dir = llm.run_dir
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(run_dir / "cluster.key").st_mode) == 0o600
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    msg, x = expert_request()
    frames = [bytes(f) for f in P.encode(msg, x)]
    answers = {who: ask_as(uid, llm.launcher.endpoint("ew0"), frames) for who, uid in (("nobody", 65534), ("owner", 0))}
    assert answers == {"nobody": "refused", "owner": "answered"}


def ask_as(uid: int, endpoint: str, frames: list[bytes]) -> str:
    """Send `frames` on a local link from a forked process running as `uid`: whether anything
    answered, or the connection was refused."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new context, nothing of the parent's used
        try:
            os.setgid(uid)
            os.setuid(uid)
            try:
                s = LinkClient(endpoint, "asker")
            except PermissionError:
                os.write(w, b"refused")
                os._exit(0)
            s.send_multipart(frames)
            os.write(w, b"answered" if s.poll(2000) else b"silent")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


def test_forged_messages_from_peers_are_ignored(cluster):
    """A process that can connect, but is not the orchestrator nor the request's attention
    worker, cannot change the driver's view, inject tokens, or read or write checkpoints."""
    llm, baseline = cluster
    launcher = llm.launcher
    # Long enough that none ends before the forged messages are in (the store counts a write or
    # drop for a request it no longer holds as nobody's): compared over the baseline's length.
    reqs = [llm.submit(p, msgspec.structs.replace(PARAMS, max_tokens=10 * PARAMS.max_tokens)) for p in PROMPTS]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 5, 60, "tokens")
    ids = live_request_ids(llm)
    driver = Peer(launcher.endpoint("driver"), "intruder")
    driver.send(P.ClusterState([], 99, False, epoch=7))  # would make the driver rerun every request
    driver.send(P.Ready("aw9", "attention", os.getpid()))
    driver.send(P.Tokens(ids, [1] * len(ids), ["stop"] * len(ids), 0, 0, 0))
    store = Peer(launcher.endpoint("store"), "aw9")
    k = torch.zeros(llm.model_config.num_layers, 2, llm.model_config.num_kv_heads, llm.model_config.head_dim)
    store.send(P.KVWrite(0, ids[:1], [0], [2], P.tensor_meta(k), P.tensor_meta(k), ids[1:]), k, k)  # overwrite, drop
    stolen = store.send(P.RestoreRequest(ids[0])).reply(2.0)
    outs = [llm.wait(r, 120) for r in reqs]
    assert [o.token_ids[: PARAMS.max_tokens] for o in outs] == baseline
    assert isinstance(stolen, P.RestoreData) and stolen.committed == 0  # no KV for a worker that does not own it
    assert llm.epoch == 0 and "aw9" not in llm.live_attention()
    wait_until(lambda: store_info(llm).get("foreign", 0) >= len(ids), 10, "the store's count of refused writes")
    driver.close()
    store.close()


def store_info(llm) -> dict:
    return next(w.info for w in llm.workers() if w.role == "store" and w.state == "ready")


def test_dead_workers_cannot_come_back(cluster):
    """Ready from a dead attention worker starts no extra one; Ready from a dead expert worker
    does not drop its healthy replacement; a moved request is restored by its new owner."""
    llm, baseline = cluster
    victim = {}

    def kill_busy_aw():
        victim["aw"] = sorted({r.worker for r in llm.in_flight()})[0]
        llm.kill(victim["aw"])

    outs = run_with_fault(llm, kill_busy_aw, after_tokens=20, prompts=PROMPTS, params=PARAMS)
    assert token_ids(outs) == baseline
    assert any(e.kind == "restored" and " 0 of " not in e.detail for e in llm.events())  # handed over to the new owner
    llm.kill("ew1")
    wait_until(lambda: any(w.name == "ew1" and w.state == "failed" for w in llm.workers()), 30, "ew1 failed")
    new_ew = wait_replaced(llm, "ew1")
    ghosts = [Peer(llm.launcher.endpoint("orchestrator"), name) for name in (victim["aw"], "ew1")]
    for _ in range(2):
        ghosts[0].send(P.Ready(victim["aw"], "attention", os.getpid(), {"kv_blocks": 1}))
        ghosts[1].send(P.Ready("ew1", "expert", os.getpid()))
        ghosts[1].send(P.WorkerFailed(new_ew, "ew1", "forged", 0.0))
    time.sleep(2.0)  # past the heartbeat timeout: a revived ghost would now be failed again
    events = llm.events()
    for name in (victim["aw"], "ew1"):
        assert sum(e.kind == "replacement_started" and e.detail == f"for {name}" for e in events) == 1
        assert sum(e.kind == "worker_failed" and e.worker == name for e in events) == 1
    assert not any(e.kind == "worker_failed" and e.worker == new_ew for e in events)
    live = [w for w in llm.workers() if w.state in ("starting", "ready")]
    assert sum(w.role == "attention" for w in live) == 2 and sum(w.role == "expert" for w in live) == 2
    assert token_ids(llm.generate(PROMPTS, PARAMS)) == baseline
    for g in ghosts:
        g.close()


def test_size_limits_and_rate_limited_drop_logs(cluster):
    llm, baseline = cluster
    orch_rss = next(w.rss_bytes for w in llm.workers() if w.name == "orchestrator")
    big = Peer(llm.launcher.endpoint("orchestrator"), "big")
    big.s.send(b"\0" * (4 * CONTROL_MAX_BYTES))  # 64 MiB: over the limit, the peer is cut off unread
    garbage = LinkClient(llm.launcher.endpoint("ew0"), "garbage")
    for i in range(300):
        garbage.send_multipart([b"\xc1" * (i % 7 + 1)])
    time.sleep(1.2)
    garbage.send_multipart([b"\xc1"])
    huge = LinkClient(llm.launcher.endpoint("ew0"), "huge")  # says 2 GiB follow: over the limit, cut off unread
    huge.send_raw(struct.pack("<II", 2 << 30, 1))
    assert huge.closed_by_peer()
    time.sleep(0.5)
    grown = next(w.rss_bytes for w in llm.workers() if w.name == "orchestrator") - orch_rss
    assert grown < CONTROL_MAX_BYTES, f"the orchestrator grew {grown >> 20} MiB"
    lines = [line for line in llm.launcher.log_path("ew0").read_text().splitlines() if "from 'garbage'" in line]
    assert len(lines) == 2 and sum(int(re.search(r"dropped (\d+) message", x).group(1)) for x in lines) == 301
    assert any("from 'huge'" in line and "bad framing" in line for line in llm.launcher.log_path("ew0").read_text().splitlines())
    assert all(w.alive for w in llm.workers() if w.state == "ready")
    assert token_ids(llm.generate(PROMPTS, PARAMS)) == baseline
    big.close()
    garbage.close()
    huge.close()


def samples(llm) -> list[list]:
    """One valid message of every type, frames encoded as the cluster would."""
    x = torch.randn(3, HIDDEN)
    cfg = llm.model_config
    k = torch.zeros(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    table = RoutingTable(0, 2, [0], [[["ew0"], ["ew1"]]])
    msgs = [
        (P.Ready("fuzz", "attention", 1),), (P.Heartbeat("fuzz"),), (P.Probe(1),), (P.Pong(1),),
        (P.Join("expert", 1, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), (P.AddRequest("fz", [1, 2], SamplingParams()),),
        (P.AbortRequest(["req-0"]),), (P.Shutdown(),), (P.GetEvents(),), (P.Report("k", "fuzz", "d", 1.0),),
        (P.WorkerFailed("ew0", "fuzz", "r", 1.0),), (P.ClusterState([], 1, True),), (P.Tokens(["req-0"], [1], [None], 0, 0, 0),),
        (P.ExpertRequest(1, 0, [0, 1], [1, 2], P.tensor_meta(x)), x), (P.ExpertReply(1, P.tensor_meta(x)), x),
        (P.KVWrite(0, ["fz"], [0], [2], P.tensor_meta(k), P.tensor_meta(k), []), k, k), (P.RestoreRequest("req-0"),),
        (P.TableUpdate(table, {}, {}),), (P.Handover(["req-0"], "fuzz"),), (P.PromptLogits("fz", P.tensor_meta(x)), x),
    ]
    return [[bytes(f) for f in P.encode(*m)] for m in msgs]


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    kind = rng.randrange(7)
    i = rng.randrange(len(frames))
    f = bytearray(frames[i])
    if kind == 0 and f:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            f[rng.randrange(len(f))] = rng.randrange(256)
    elif kind == 1:  # truncate
        f = f[: rng.randrange(len(f) + 1)]
    elif kind == 2:  # extend
        f += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3:  # a frame too many, or one missing
        return frames + [b"\x00" * rng.randint(0, 64)] if rng.random() < 0.5 or len(frames) == 1 else frames[:-1]
    elif kind == 4:  # a huge declared length (msgpack array32 / bin32 of 4 G items)
        f = bytearray(rng.choice([b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\x81\xa4type\xdb\xff\xff\xff\xff"]))
    elif kind == 5:  # a large frame (under the socket's limit)
        f = bytearray(rng.randbytes(rng.choice([1 << 16, 1 << 20])))
    else:  # random header
        f = bytearray(rng.randbytes(rng.randint(0, 40)))
    frames[i] = bytes(f)
    return frames


def test_wire_fuzz_every_socket(cluster):
    """Mutated, truncated and oversized frames to every socket of a running cluster: every
    process stays up, and the next generation has the failure-free tokens."""
    llm, baseline = cluster
    la = llm.launcher
    pids = {w.name: w.pid for w in llm.workers() if w.state == "ready"}
    aw = next(w.name for w in llm.workers() if w.role == "attention" and w.state == "ready")
    ew = next(w.name for w in llm.workers() if w.role == "expert" and w.state == "ready")
    store = next(w.name for w in llm.workers() if w.role == "store" and w.state == "ready")
    targets = [la.endpoint("orchestrator"), la.endpoint("driver"), la.endpoint("store"), la.probe_endpoint(store),
               la.probe_endpoint(ew), la.probe_endpoint(aw)]
    rng = random.Random(16)
    base = samples(llm)
    peers = [Peer(t, f"fuzz-{i}") for i, t in enumerate(targets)] + [LinkClient(la.endpoint(ew), "fuzz-link")]
    t0 = time.monotonic()
    sent = 0
    for _ in range(120):
        for p in peers:
            (p if isinstance(p, LinkClient) else p.s).send_multipart(mutate(rng, rng.choice(base)) if rng.random() < 0.9 else rng.choice(base))
            sent += 1
    for _ in range(40):  # the expert worker's link framing itself: random bytes, each on a new link
        c = LinkClient(la.endpoint(ew), rng.choice([None, "fuzz-bytes"]))
        c.send_raw(rng.randbytes(rng.randint(1, 64)))
        c.close()
    time.sleep(1.0)
    for p in peers:
        p.close()
    assert time.monotonic() - t0 < 30
    assert not LinkClient(la.endpoint(ew), "fuzz-link-after").closed_by_peer(200), "the link is still served"
    after = {w.name: w.pid for w in llm.workers() if w.state == "ready"}
    assert after == pids and all(w.alive for w in llm.workers() if w.name in pids), f"{sent} frames: {pids} -> {after}"
    assert token_ids(llm.generate(PROMPTS, PARAMS)) == baseline


# ---- a cluster over tcp:// (CURVE) ----------------------------------------------------------


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_tcp_sockets_serve_only_the_cluster_key(tiny_models, tmp_path):
    """Workers join a manual cluster over tcp with the key file; clients without a key or with a
    wrong one are refused by the join socket, the store and an expert worker's datapath (a
    worker with the wrong key gets no slot), while a client with the key is answered."""
    address = free_address()
    key_file, wrong_file = tmp_path / "cluster.key", tmp_path / "wrong.key"
    ClusterKey.generate().save(key_file)
    ClusterKey.generate().save(wrong_file)
    key = ClusterKey.load(key_file)
    procs: dict[str, subprocess.Popen] = {}

    def start(label: str, role: str, kf) -> None:
        with open(tmp_path / f"{label}.log", "wb") as log:
            procs[label] = subprocess.Popen([sys.executable, "-m", "tarragon", "worker", "--role", role, "--join", address,
                                             "--key-file", str(kf), "--timeout", "60" if kf == key_file else "8"],
                                            stdout=log, stderr=subprocess.STDOUT)

    keyless_joiner = Peer(address, "join-keyless", server_key=None)
    wrong_joiner = Peer(address, "join-wrong", server_key=key.public)
    try:
        for p in (keyless_joiner, wrong_joiner):
            p.send(P.Join("store", os.getpid(), "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"))
        start("impostor", "expert", wrong_file)  # first in line: a slot would be its, were it let in
        for label, role in (("store", "store"), ("ew", "expert"), ("aw", "attention")):
            start(label, role, key_file)
        with LLM(tiny_models["olmoe"], attention_workers=1, expert_workers=1, launcher="manual", join_address=address,
                 key_file=str(key_file)) as llm:
            baseline = token_ids(llm.generate(PROMPTS, PARAMS))
            assert all(w.pid == 0 for w in llm.workers() if w.role != "orchestrator")  # a joiner's pid is never believed
            with pytest.raises(ValueError):
                llm.kill("ew0")
            assert procs["impostor"].wait(30) == 1 and "no expert slot" in (tmp_path / "impostor.log").read_text()
            assert keyless_joiner.reply(0.1) is None and wrong_joiner.reply(0.1) is None
            served = {label: re.search(r"serving on (tcp://\S+)", (tmp_path / f"{label}.log").read_text()).group(1)
                      for label in ("store", "ew")}
            ids = [llm.submit(p, SamplingParams(max_tokens=400, ignore_eos=True)) for p in PROMPTS[:1]]
            wait_until(lambda: len(ids[0].tokens) >= 3, 60, "tokens")
            for client_key, expect in ((None, False), (ClusterKey.generate(), False), (key, True)):
                mk = (lambda ep, name: Peer(ep, name)) if client_key is None else \
                    (lambda ep, name: Peer(ep, name, server_key=key.public, key=client_key))
                msg, x = expert_request()
                ew_reply = mk(served["ew"], "aw0x").send(msg, x).reply(1.0)
                store_reply = mk(served["store"], "spy").send(P.RestoreRequest(ids[0].req_id)).reply(1.0)
                join_reply = mk(address, "join-x").send(P.Join("store", 1, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")).reply(0.3)
                assert (ew_reply is not None, store_reply is not None) == (expect, expect), client_key
                assert join_reply is None  # no open slot for anyone
            llm.abort(ids[0])
            assert token_ids(llm.generate(PROMPTS, PARAMS)) == baseline
    finally:
        keyless_joiner.close()
        wrong_joiner.close()
        for p in procs.values():
            p.kill()
            p.wait()


# ---- in-process: keys, the store's owners, drop logs, the explicit opt-out -------------------


def test_key_files_are_private_and_checked(tmp_path):
    key = ClusterKey.generate()
    key.save(tmp_path / "k")
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600 and ClusterKey.load(tmp_path / "k") == key
    with pytest.raises(FileExistsError):
        key.save(tmp_path / "k")  # never overwritten
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(PermissionError):
        ClusterKey.load(tmp_path / "k")
    (tmp_path / "bad").write_text('{"public": "x", "secret": "y"}')
    os.chmod(tmp_path / "bad", 0o600)
    with pytest.raises(ValueError):
        ClusterKey.load(tmp_path / "bad")


def test_store_serves_a_checkpoint_to_its_owner_only():
    from tarragon.checkpoint_store import HANDOVER_WAIT_S, CheckpointStore

    store = CheckpointStore(max_bytes=1 << 20)
    k = torch.ones(3, 4, 2, 4)
    write = P.KVWrite(0, ["r"], [0], [4], P.tensor_meta(k), P.tensor_meta(k), [])
    store.write("aw0", write, k, k)
    store.write("aw9", P.KVWrite(0, ["r"], [0], [4], P.tensor_meta(k), P.tensor_meta(k), ["r"]), k * 0, k * 0)
    assert store.foreign == 2 and store.restore("r")[0] == 4 and torch.equal(store.restore("r")[1], k)
    assert store.may_restore("aw0", "r") and not store.may_restore("aw1", "r")
    store.parked = [(b"aw1", "r", 0.0), (b"aw9", "r", time.monotonic())]
    store.hand_over(P.Handover(["r"], "aw1"))  # the driver moved r to aw1
    assert store.due_restores(time.monotonic()) == [(b"aw1", "r", True)]
    assert store.due_restores(time.monotonic() + HANDOVER_WAIT_S + 0.1) == [(b"aw9", "r", False)]
    store.write("aw1", P.KVWrite(1, ["r"], [4], [4], P.tensor_meta(k), P.tensor_meta(k), []), k, k)
    assert store.restore("r")[0] == 8


def test_drop_log_is_rate_limited(caplog):
    from tarragon.sockets import DropLog

    d = DropLog(interval_s=0.2)
    with caplog.at_level("WARNING", logger="tarragon.sockets"):
        for _ in range(500):
            d.note("ew0", "x", "bad")
        time.sleep(0.25)
        d.note("ew0", "x", "bad")
        d.note("ew0", "y", "bad")
    counts = [int(re.search(r"dropped (\d+)", r.message).group(1)) for r in caplog.records]
    assert counts == [1, 500, 1] and d.total == 502


def test_insecure_transport_is_explicit():
    """CURVE is on for tcp unless the context was made without a key on purpose; sockets from a
    plain zmq.Context are refused, so nothing is unauthenticated by accident."""
    from tarragon.sockets import Context, make_socket

    with pytest.raises(TypeError):
        make_socket(zmq.Context.instance(), zmq.ROUTER, bind="tcp://127.0.0.1:*")
    for key, answered in ((ClusterKey.generate(), False), (None, True)):
        ctx = Context(key)
        server = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*")
        client = Peer(server.getsockopt_string(zmq.LAST_ENDPOINT), "plain")
        client.send(P.Probe(1))
        assert bool(server.poll(500)) == answered
        client.close()
        ctx.destroy(0)

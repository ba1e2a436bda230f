"""What every worker process is told, and what each does beside its role.

`WorkerSpec` is a worker's whole configuration (the command line of `python -m
tarragon.worker_main`, a Ray actor's call, or the `Assign` a hand-joined worker gets). The rest
is what every role's process shares (`worker_main.serve` sets it up, the role's `run` uses it):

A local worker dies with the driver (the process that holds the clients' connections), not with
the orchestrator that started it: it watches the driver's pidfd, so it keeps serving while a dead
orchestrator is replaced, and re-registers with the successor (its liveness thread resends its last
`Ready` whenever its channel to the orchestrator reconnects). A Ray actor dies with its owner, the
orchestrator, by Ray's own fate-sharing.

Beside its main loop every worker runs a liveness thread: it answers probes at once (peers probe
a worker that owes them a reply and stays silent) and sends the orchestrator heartbeats. A
stopped process (SIGSTOP) does neither, so it is detected like a dead one.

SIGTERM (a preemption notice, a rolling restart) asks for a planned drain: the liveness thread
tells the orchestrator, which moves the worker's requests or experts off before shutting it down.

Imports only torch, safetensors, zmq and msgspec (never transformers), so workers start fast.
"""

from __future__ import annotations

import ctypes
import gc
import ipaddress
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from .config import TarragonConfig
from .routing_table import RoutingTable
from .sockets import ClusterKey, Context, make_socket, recv
from .vocabulary import Role

log = logging.getLogger(__name__)


class WorkerSpec(msgspec.Struct, kw_only=True):
    """One worker's start-up: the cluster's configuration (a view of it: the settings are read from
    `config`, never copied) and what is this worker's own (name, role, endpoints, experts, table)."""

    name: str
    role: Role
    config: TarragonConfig
    orch_endpoint: str
    probe_endpoint: str = ""  # where it answers probes (filled in by the launcher)
    parent_pid: int
    driver_pid: int = 0  # local workers: die with this process (the driver), not with their parent
    endpoint: str = ""  # expert worker, store: where it binds ("": the launcher picks)
    experts: list[tuple[int, int]] = []  # expert worker: (layer, expert) pairs it loads
    shadow_experts: list[tuple[int, int]] = []  # expert worker: which of them are shadows
    store_endpoints: list[str] = []  # attention worker: the checkpoint stores, each written in full (none: no checkpointing)
    driver_endpoint: str = ""  # attention worker: where requests come from
    expert_endpoints: dict[str, str] = {}  # attention worker: expert worker name -> endpoint
    probe_endpoints_of_experts: dict[str, str] = {}  # attention worker: where to probe each one
    table: RoutingTable | None = None  # attention worker: its routing table
    nice: int = 0  # replacements start at idle CPU priority, so serving workers keep their cores

    @property
    def model_dir(self) -> str:
        return self.config.model.path

    @property
    def dtype(self) -> str:
        return self.config.model.dtype

    @property
    def device(self) -> str:
        return self.config.model.device

    @property
    def threads(self) -> int:
        return self.config.cluster.threads_per_worker

    @property
    def heartbeat_s(self) -> float:
        return self.config.resilience.heartbeat_s

    @property
    def probe_interval_s(self) -> float:
        return self.config.resilience.probe_interval_s

    @property
    def probe_timeout_s(self) -> float:
        return self.config.resilience.probe_timeout_s

    @property
    def store_max_bytes(self) -> int:
        return self.config.resilience.store_max_bytes

    @property
    def insecure_transport(self) -> bool:
        return self.config.cluster.insecure_transport

    @property
    def key_file(self) -> str:
        """Local launcher: the cluster's CURVE key (0600, in the 0700 run folder)."""
        return self.config.cluster.key_file


def cluster_key(spec: WorkerSpec) -> ClusterKey | None:
    """The key a worker started by the local launcher reads from its run folder."""
    if spec.insecure_transport:
        return None
    if not spec.key_file:
        raise ValueError("no cluster key: a worker needs key_file (or insecure_transport, explicitly)")
    return ClusterKey.load(spec.key_file)


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def die_with_driver(driver_pid: int) -> None:
    """Exit when the driver does (even by SIGKILL), but outlive the orchestrator that started us."""
    try:
        fd = os.pidfd_open(driver_pid)
    except ProcessLookupError:
        os._exit(1)  # it died before we could watch it

    def watch() -> None:
        select.select([fd], [], [])  # a pidfd turns readable when its process exits
        os._exit(1)

    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(keep_bytes: int = 1 << 30) -> None:
    """Let glibc's malloc keep up to `keep_bytes` of freed memory for reuse instead of returning it
    to the kernel. A step allocates and frees the same few-MB tensors (gathered KV context,
    activations, a store's chunks) again and again; by default blocks that large are mmapped, or
    trimmed off the heap top, on every free, so every step page-faults them back in zeroed
    (measured: ~1,200 faults and about half the decode attention time at 64 sequences x 80 tokens;
    a fifth of a store's CPU). Memory stays bounded by the peak. Not glibc: nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling; larger blocks are still mmapped
    mallopt(M_TRIM_THRESHOLD, keep_bytes)


def may_raise_priority(nice: int) -> bool:
    """Whether this process could come back from `nice` (and SCHED_IDLE) to normal priority: root,
    or RLIMIT_NICE allowing nice 0. Otherwise a replacement starts at normal priority, since one
    that stayed low would miss probes under load."""
    import resource

    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def loaded(spec: WorkerSpec) -> None:
    """What each role does once loaded, before its `Ready`: takes its serving priority back (a
    replacement), and freezes its start-up heap."""
    restore_priority(spec)
    freeze_heap()


def freeze_heap() -> None:
    """Everything alive now (imports, weights, the model's objects: ~170 k tracked objects) is
    moved out of the garbage collector's reach (`gc.freeze`), as vLLM does once warmed up: a
    full collection of it stopped an attention worker for 80-85 ms in the middle of a decode step
    (the first 32-request run after start-up, 2 x 2: a 97 ms step among 4-8 ms ones). No
    collection first (vLLM's `gc.collect()`): it would take those 85 ms at every worker's start,
    seven at once on a small machine, for the few cycles start-up leaves, kept instead."""
    gc.freeze()


def restore_priority(spec: WorkerSpec) -> None:
    """Once loaded, a replacement serves at normal priority (needs privileges; else stays low).
    Announced while still at SCHED_IDLE, a replacement was routed to and then starved on a busy
    machine (no reply, no heartbeat: declared failed)."""
    if not spec.nice:
        return
    # Every thread: on Linux both settings are per thread, and the liveness thread (started while
    # the process was low) would stay SCHED_IDLE, miss heartbeats under load, and get it replaced.
    for tid in _threads():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:
            pass
    serving_policy(Role(spec.role))


LIVENESS_THREAD = "liveness"  # its name: `serving_policy` finds it by it


def never_preempt(tids: list[int] | None = None) -> None:
    """Run threads (default: the calling one; threads it starts later inherit it) as SCHED_BATCH:
    they get their fair share of CPU but never preempt a running thread when they wake.

    Why: an attention worker's step is the critical path, and in the middle of it it wakes others
    (the expert workers a layer's rows, the stores a checkpoint, the driver its tokens). With more
    processes than cores, the first one woken took its core: the attention worker sat runnable,
    and a layer's second expert worker started only after the first had finished. Measured at 2 x
    2 on 2 cores (perf sched): 1.5 ms a step of the attention worker preempted by those it woke at
    32 requests; with this, +5-14 % tokens/s at 1-64 requests. Needs no privilege.
    TARRAGON_SCHED_BATCH=0 leaves every thread normal (for comparison)."""
    if os.environ.get("TARRAGON_SCHED_BATCH", "1") == "0" or not hasattr(os, "SCHED_BATCH"):
        return
    for tid in tids if tids is not None else [0]:
        try:
            if os.sched_getscheduler(tid) not in (os.SCHED_FIFO, os.SCHED_RR):  # real-time priority given stays
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # gone, or SCHED_IDLE without the right to leave it: stays as it is
            pass


def zmq_threads() -> list[int]:
    """ZeroMQ's own threads in this process (I/O, reaper: libzmq names them "ZMQbg/..."); they
    start with a context's first socket."""
    return [tid for tid in _threads() if _comm(tid).startswith("ZMQbg/")]


def await_zmq_threads(ctx: zmq.Context, timeout_s: float = 0.5) -> None:
    """Wait until `ctx`'s threads (its I/O threads and its reaper) have their names. libzmq sets
    each name from inside the thread, once the context's first socket has started it; until then
    `serving_policy`, which finds them by name, would leave one at the normal policy (seen twice
    in ~20 test runs)."""
    deadline = time.monotonic() + timeout_s
    while len(zmq_threads()) < ctx.get(zmq.IO_THREADS) + 1 and time.monotonic() < deadline:
        time.sleep(0.001)


def serving_policy(role: Role) -> None:
    """Every thread of a worker at the policy it serves under: an attention worker's compute (its
    main thread, torch's threads) normal, all else SCHED_BATCH (see `never_preempt`). Each thread
    is set: a worker inherits its launcher's policy (the orchestrator's: SCHED_BATCH), and a
    replacement loads at SCHED_IDLE. A thread under real-time priority keeps it."""
    helpers = set(zmq_threads()) | {t.native_id for t in threading.enumerate() if t.name == LIVENESS_THREAD}
    for tid in _threads():
        try:
            if os.sched_getscheduler(tid) not in (os.SCHED_FIFO, os.SCHED_RR):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
        if role is not Role.ATTENTION or tid in helpers:
            never_preempt([tid])


def _threads() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read()
    except OSError:
        return ""


class OrchestratorChannel:
    """A worker's channel to the orchestrator. Sends never block (a dead or hung orchestrator must
    not stall serving; messages queue for its successor, or are dropped once the queue is full),
    and the last `Ready` sent is kept, so the liveness thread can register again with a successor.
    The role's loop reads `sock` (control messages: shutdown, drain, routing tables)."""

    def __init__(self, ctx: Context, name: str, endpoint: str):
        self.name = name
        self.sock = make_socket(ctx, zmq.DEALER, connect=endpoint, identity=name, linger_ms=1000)
        self.last_ready: list[bytes] | None = None

    def send(self, msg: P.Msg) -> None:
        frames = P.encode(msg)
        if isinstance(msg, P.Ready):
            self.last_ready = frames
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("%s: orchestrator unreachable, message dropped", self.name)


def start_liveness(ctx: Context, name: str, probe_endpoint: str, orch_endpoint: str, heartbeat_s: float,
                   orch: OrchestratorChannel | None = None, drain: threading.Event | None = None,
                   on_shutdown: Callable[[], None] = lambda: os._exit(0)) -> threading.Thread:
    """Answers probes and sends heartbeats; each time its channel to the orchestrator (re)connects,
    resends `orch.last_ready`: a replacement orchestrator learns of this worker without a restart.
    Once `drain` is set (SIGTERM), asks the orchestrator for a drain (again at each reconnection).
    A `Shutdown` on the heartbeat channel (sent to a fenced or unknown worker that still beats, in
    case the one on its main channel is lost or its main thread waits elsewhere) calls
    `on_shutdown`: by default the process ends there, as a fenced worker must."""
    probe = make_socket(ctx, zmq.ROUTER, bind=probe_endpoint)
    hb = make_socket(ctx, zmq.DEALER, connect=orch_endpoint, identity=f"{name}#hb", monitor=zmq.EVENT_CONNECTED)
    mon = hb.get_monitor_socket(zmq.EVENT_CONNECTED)
    beat = P.encode(P.Heartbeat(name))
    poller = zmq.Poller()
    poller.register(probe, zmq.POLLIN)
    poller.register(mon, zmq.POLLIN)
    poller.register(hb, zmq.POLLIN)

    def send(frames: list) -> None:
        try:
            hb.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # the orchestrator is gone: beats wait for its successor, or are dropped
            pass

    def loop() -> None:
        next_beat, drain_asked = 0.0, False
        while True:
            now = time.monotonic()
            if now >= next_beat:
                send(beat)
                next_beat = now + heartbeat_s
            if drain is not None and drain.is_set() and not drain_asked:
                send(P.encode(P.Drain(name)))
                drain_asked = True
            events = dict(poller.poll(max(0.0, next_beat - now) * 1000))
            if mon in events:
                recv_monitor_message(mon)
                if orch is not None and orch.last_ready:
                    send(orch.last_ready)
                drain_asked = False
            if probe in events:
                got = recv(probe, (P.Probe,), f"{name} probe")
                if got is not None:
                    probe.send_multipart([got.identity, *P.encode(P.Pong(got.msg.seq))])
            if hb in events and recv(hb, (P.Shutdown,), f"{name} (orchestrator, heartbeats)") is not None:
                log.warning("%s: out of service, told to shut down", name)
                on_shutdown()
                return

    t = threading.Thread(target=loop, name=LIVENESS_THREAD, daemon=True)
    t.start()
    return t


def reserve_endpoints(host: str, endpoint: str = "") -> tuple[str, str, list[socket.socket]]:
    """Two TCP addresses on this host for a worker's sockets (its datapath and its probes), known
    before its spec is written, so nobody guesses a port: each is held by a bound, not listening,
    SO_REUSEADDR socket that only the worker's own ZMQ socket (SO_REUSEADDR too) can bind beside.
    `endpoint` asks for that exact address (a new checkpoint store takes over its predecessor's).
    Keep the returned sockets open while the worker runs."""
    held = []
    for addr in (endpoint, ""):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(addr.rsplit(":", 1)[1])) if addr else (host, 0))
        held.append(s)
    return *(f"tcp://{host}:{s.getsockname()[1]}" for s in held), held


def host_towards(address: str) -> str:
    """This host's address on the route to `address` (tcp://HOST:PORT); loopback stays loopback."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    if ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]

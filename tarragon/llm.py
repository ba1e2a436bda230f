"""The driver: `LLM`, the user's handle on a cluster of worker processes.

It launches the expert workers and attention workers, spreads requests over the attention
workers, and collects their tokens. One I/O thread owns the control socket (ZMQ sockets are not
thread-safe): other threads hand it outgoing messages through an in-process pipe. The I/O thread
survives any error of a handler (logged), supervises the orchestrator (a dead or silent one is
replaced by a successor that adopts the running workers), and ends requests with an error when the
cluster has produced no token for `stall_timeout_s`: no request ever waits forever.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import os
import queue
import secrets
import signal
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch
import zmq

from . import protocol as P
from .config import EngineConfig, ModelConfig
from .hub import resolve_model
from .kv_cache import bytes_per_block
from .launcher import LocalLauncher, control_host, pid_alive as _pid_alive
from .orchestrator import ClusterSpec
from .shadow_placement import place
from .sockets import ClusterKey, Context, Received, drops, make_socket, recv
from .sampling import SamplingParams, TokenLogprobs
from .tokenizer import Detokenizer, Tokenizer
from .weights import WeightFiles, torch_dtype

log = logging.getLogger(__name__)

# tarragon: restore KV from the checkpoint store; recompute: re-prefill prompt + output elsewhere
# (request migration); restart: restart every worker and rerun from the prompts; replay:
# recompute token by token (a baseline for the restore benchmark).
RECOVERY_POLICIES = ("tarragon", "recompute", "restart", "replay")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    token_times: list[float]  # time.monotonic() at which each token reached the driver
    prompt_logits: torch.Tensor | None = None  # [len(prompt), vocab] fp32, when asked for
    logprobs: list[TokenLogprobs] | None = None  # per output token, when SamplingParams.logprobs is set
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None: EOS or length)
    error: str | None = None  # why it ended early (finish_reason "error"): the cluster could not serve it


@dataclass
class WorkerInfo:
    name: str
    role: str  # "attention" | "expert" | "orchestrator"
    pid: int
    alive: bool  # the process exists (a stopped process is alive)
    state: str  # the orchestrator's view: "starting" | "ready" | "draining" | "failed" | "stopped"
    rss_bytes: int
    kv_blocks_used: int | None = None
    kv_blocks_total: int | None = None
    expert_bytes: int | None = None  # expert weights held, shadows included
    shadow_bytes: int | None = None  # of which inactive shadow copies
    replaces: str = ""
    info: dict = field(default_factory=dict)  # what the worker reports (e.g. the store's byte accounting)


@dataclass
class Request:
    """The driver's record of one request: everything the client has been sent."""

    req_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    worker: str
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logits: torch.Tensor | None = None
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per token, when asked for
    stop_reason: str | int | None = None
    detok: Detokenizer | None = None  # its text, decoded as tokens arrive (see `advance`)
    done: threading.Event = field(default_factory=threading.Event)
    skip: int = 0  # tokens to drop: a rerun from the prompt regenerates what the client has
    submitted: float = field(default_factory=time.monotonic)
    error: str | None = None  # set with finish_reason "error"
    listener: Callable[[], None] | None = None  # called (on the I/O thread) at each token and at the end


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        attention_workers: int = 2,
        expert_workers: int = 2,
        device: str = "cpu",
        dtype: str = "auto",
        shadows: int = 1,
        shadow_budget_bytes: int | None = None,
        replace_failed: bool = True,
        probe_interval_s: float = 0.01,
        probe_timeout_s: float = 0.1,
        heartbeat_timeout_s: float = 1.0,
        recovery: str = "tarragon",
        startup_timeout: float = 120.0,
        launcher: str = "local",
        placement: str = "auto",
        ray_address: str | None = None,
        join_address: str | None = None,
        nodes: dict[str, str] | None = None,
        key_file: str | None = None,
        insecure_transport: bool = False,
        log_dir: str | Path | None = None,
        stall_timeout_s: float = 60.0,
        progress_timeout_s: float = 10.0,
        orchestrator_timeout_s: float = 3.0,
        stores: int | None = None,
        **engine_args,
    ):
        """`stall_timeout_s`: requests end with an error once the cluster has produced no token for
        this long while they wait; `progress_timeout_s`: `health()` fails after this long without a
        token while requests wait; `orchestrator_timeout_s`: an orchestrator silent this long is
        replaced (local launcher), or reported unhealthy; `stores`: checkpoint stores, each
        holding every checkpoint (default 2 with the local launcher, so a store's death loses no
        checkpoint; 1 with ray or manual, where a second store wants a host and a join of its own).
        `probe_timeout_s` and `heartbeat_timeout_s` are floors: both timeouts grow with the latency
        the cluster shows (see tarragon/timeouts.py, which also holds the gray-failure settings)."""
        if model is None:
            from .make_model import demo_model

            model = demo_model()
        model = resolve_model(model)  # a folder, or a Hub id resolved into the Hugging Face cache
        if attention_workers < 1 or expert_workers < 1:
            raise ValueError("need at least one attention worker and one expert worker")
        stores = stores if stores is not None else 2 if launcher == "local" else 1
        if stores < 1:
            raise ValueError(f"stores must be >= 1, got {stores}")
        if recovery not in RECOVERY_POLICIES:
            raise ValueError(f"recovery must be one of {', '.join(RECOVERY_POLICIES)}, not {recovery!r}")
        self.recovery = recovery
        if placement not in ("auto", "pack", "spread"):
            raise ValueError(f"placement must be auto, pack or spread, not {placement!r}")
        # auto: spread when every worker process can have a core of its own, else pack.
        workers = attention_workers + expert_workers + stores
        self.placement = placement if placement != "auto" else "spread" if (os.cpu_count() or 1) >= workers else "pack"
        if shadows < 0:
            raise ValueError(f"shadows must be >= 0, got {shadows}")
        shadows = min(shadows, expert_workers - 1)  # a shadow never shares its primary's worker
        self.shadows = shadows
        if dtype == "auto":  # bf16 where the hardware is built for it; fp32 on CPUs, where bf16 is slower here
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        gpus = _visible_gpus() if device == "cuda" and launcher == "local" else []  # Ray gives each actor its GPU
        self.config = EngineConfig(str(model), attention_workers, expert_workers, device, dtype, stores=stores, **engine_args)
        self.model_config = cfg = ModelConfig.from_dir(model)
        WeightFiles(model).close()  # fail here, clearly, on a missing or corrupt checkpoint
        self.tokenizer = Tokenizer(model)
        e = self.config
        tdtype = torch_dtype(dtype)
        kv_blocks = e.kv_cache_blocks or e.kv_cache_bytes // bytes_per_block(cfg, e.block_size, tdtype)
        e.kv_cache_blocks = kv_blocks
        limits = [e.max_model_len, cfg.max_position_embeddings, kv_blocks * e.block_size]
        self.max_model_len = e.max_model_len = min(limits + ([cfg.sliding_window] if cfg.sliding_window else []))

        # Workers on other hosts reach the driver over TCP (ray, manual); local ones over IPC.
        host, ray_address, self._ray_started = control_host(launcher, ray_address, join_address,
                                                            (attention_workers + expert_workers + 1) * e.threads_per_worker)
        _remove_orphaned_run_dirs()
        self._run_dir = Path(tempfile.mkdtemp(prefix="tarragon-"))
        (self._run_dir / "driver").write_text(_process_id(os.getpid()))  # whose it is, for the clean-up above
        self._log_dir = Path(log_dir) if log_dir else None  # where the workers' logs are kept at shutdown
        self._events_lock = threading.Lock()  # one GetEvents in flight: replies carry no request id
        self._launcher = LocalLauncher(self._run_dir)
        key, key_file = _cluster_key(self._run_dir, key_file, insecure_transport)
        self._ctx = Context(key)
        self._router = make_socket(self._ctx, zmq.ROUTER, bind=f"tcp://{host}:*" if host else self._launcher.endpoint("driver"),
                                   max_bytes=P.MAX_MESSAGE_BYTES)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._local = not host
        endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._outbox_addr = f"inproc://outbox-{id(self)}"
        self._outbox_in = make_socket(self._ctx, zmq.PULL, bind=self._outbox_addr, max_bytes=P.MAX_MESSAGE_BYTES)
        self._outbox = make_socket(self._ctx, zmq.PUSH, connect=self._outbox_addr)
        self._outbox.setsockopt(zmq.SNDTIMEO, 2000)  # never block a caller forever on a stuck I/O thread
        self._probes = AttentionProbes(self._ctx)  # used by the I/O thread only
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._closed = False
        self._state: P.ClusterState | None = None
        self._hello: set[str] = set()  # attention workers connected to this driver
        self._draining: set[str] = set()  # attention workers that handed their requests back
        self.slot_of: dict[str, str] = {}  # every worker seen -> the planned place it held (outlives its record)
        self._kv_used: dict[str, int] = {}
        self._replayed: dict[str, int] = {}
        self._replies: queue.Queue = queue.Queue()
        self._orphans: list[Request] = []  # requests waiting for a live attention worker
        self._pending_aborts: list[str] = []  # aborted orphans: their checkpoints are still to drop
        self._epoch = 0
        self.stall_timeout_s, self.progress_timeout_s, self.orchestrator_timeout_s = stall_timeout_s, progress_timeout_s, orchestrator_timeout_s
        self._progress = time.monotonic()  # the last token, or when requests began waiting on an idle cluster
        self._orch_seen = 0.0  # the last message from the orchestrator
        self._orch_heard = False  # from the current one (not yet, after a replacement)
        self._serving = False  # start-up is over: the orchestrator is supervised from now on
        self._orch_started = self._next_check = 0.0
        self.orchestrator_restarts = 0
        self._stall_watch: list[tuple[dict[str, float], list[float]]] = []  # per failure: last token times, max gap
        self.stalls: list[float] = []  # per failure: the largest token gap it caused across streams
        self.failures: dict[str, int] = {}  # failures seen, by role
        self.reassigned: dict[str, int] = {"restored": 0, "recomputed": 0, "rerun": 0}
        # Per reassignment (one per failure): when, how many requests, and the tokens computed again
        # to resume them: prompt + output for `recompute`/`replay` and for `restart` reruns. A
        # restore's uncommitted tail is known only to its new worker, which reports it ("restored").
        self.recomputed: list[dict] = []

        expert_bytes = 3 * cfg.hidden_size * cfg.expert_intermediate_size * tdtype.itemsize
        plan = place(cfg.num_experts, list(cfg.sparse_layers), [f"ew{j}" for j in range(expert_workers)],
                     shadows, expert_bytes, shadow_budget_bytes, nodes)
        self.plan = plan  # version 0 of the routing table: primaries and shadows
        self._cluster = cluster = ClusterSpec(
            model_dir=str(model), dtype=dtype, device=device, engine=e, plan=plan, attention_workers=attention_workers,
            run_dir=str(self._run_dir), driver_endpoint=endpoint, parent_pid=os.getpid(), threads=e.threads_per_worker,
            heartbeat_timeout_s=heartbeat_timeout_s, probe_interval_s=probe_interval_s, probe_timeout_s=probe_timeout_s,
            replace_failed=replace_failed, recovery=recovery, launcher=launcher, host=host, ray_address=ray_address,
            join_address=join_address or "", nodes=nodes or {}, gpus=gpus, key_file=key_file,
            insecure_transport=insecure_transport,
        )
        atexit.register(self.shutdown)
        self._io = threading.Thread(target=self._io_loop, name="tarragon-io", daemon=True)
        self._io.start()
        self._orch = _spawn(self._launcher.start, "tarragon.orchestrator", "orchestrator", cluster)
        self._orch_started = time.monotonic()
        try:
            self._wait_ready(startup_timeout, attention_workers + expert_workers)
        except BaseException:
            self.shutdown()
            raise
        self._serving = True

    # ---- lifecycle ------------------------------------------------------------------------

    def _wait_ready(self, timeout: float, total: int) -> None:
        from tqdm import tqdm

        deadline = time.monotonic() + timeout
        last = 0
        with tqdm(total=total, desc="starting workers", unit="worker", leave=False, disable=None) as bar:
            while True:
                state = self._state
                ready = sum(w.state == "ready" for w in state.workers) if state else 0
                if ready != last:  # progress lines too: there may be no terminal for the bar
                    log.info("workers ready: %d of %d", ready, len(state.workers) if state else total)
                    bar.update(ready - last)
                    last = ready
                aws = [w.name for w in state.workers if w.role == "attention"] if state else []
                if state and state.ready and all(a in self._hello for a in aws):
                    return
                if self._orch.poll() is not None:
                    raise RuntimeError(f"the orchestrator exited during start-up:\n{self._launcher.log_tail('orchestrator')}")
                for w in state.workers if state else []:
                    if w.state == "failed":
                        raise RuntimeError(f"worker {w.name} failed during start-up:\n{self._launcher.log_tail(w.name)}\n"
                                           f"{self._launcher.log_tail('orchestrator')}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers not ready after {timeout:.0f}s")
                time.sleep(0.02)

    def shutdown(self) -> None:
        """Stop every worker process (politely, then by force) and release resources."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        with self._lock:
            pending = list(self._requests.values())
        for req in pending:
            self._end_with_error(req, "the LLM was shut down")
        try:
            self._send("orchestrator", P.Shutdown())
            self._orch.wait(8.0)
        except Exception:
            self._orch.kill()
            self._orch.wait()
        for w in self._state.workers if self._state and self._local else []:  # belt and braces (pids of this host)
            if _pid_alive(w.pid):
                os.kill(w.pid, signal.SIGKILL)
        with self._lock:
            self._outbox.send_multipart([b""])
            self._outbox.close(0)
        self._io.join(timeout=5.0)
        if self._io.is_alive():  # last resort: closes the I/O thread's sockets under it
            self._ctx.destroy(linger=0)
        else:
            self._ctx.term()
        if self._log_dir:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            for f in self._run_dir.glob("*.log"):
                shutil.copy2(f, self._log_dir / f.name)
        shutil.rmtree(self._run_dir, ignore_errors=True)
        if self._ray_started:
            import ray

            ray.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- failures (tests and demos) ---------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to a worker process, e.g. SIGKILL or SIGSTOP (fault injection). Only a
        process the cluster started has a pid here: one that joined by hand has 0 (what it
        claims is never believed), and signalling 0 would hit this process's own group."""
        pid = next((w.pid for w in self.workers() if w.name == name), None)
        if pid is None:
            raise KeyError(f"no worker named {name!r}")
        if pid <= 0:
            raise ValueError(f"{name} joined by hand: signal it on its own host")
        os.kill(pid, sig)

    def drain(self, name: str) -> None:
        """Take a worker out of service without a stall (a rolling restart, a preemption notice):
        a replacement starts; an attention worker's requests move to others through the store
        (their KV committed, nothing recomputed); an expert worker's calls go to its shadows (or,
        with none, it serves until its replacement is ready). Then it exits. Returns at once;
        the event log records `drain_started` and `worker_drained`. SIGTERM to a worker does the same."""
        role = next((w.role for w in self.workers() if w.name == name and w.state == "ready"), None)
        if role not in ("attention", "expert"):
            raise ValueError(f"{name!r} is not a ready attention or expert worker")
        self._send("orchestrator", P.Drain(name))

    def events(self, timeout: float = 5.0) -> list[P.Event]:
        """The orchestrator's event log: failures, detections, routing updates, replacements."""
        with self._events_lock:
            while not self._replies.empty():
                self._replies.get_nowait()
            self._send("orchestrator", P.GetEvents())
            try:
                return self._replies.get(timeout=timeout).events
            except queue.Empty:
                raise TimeoutError(f"the orchestrator did not answer within {timeout:.1f} s") from None

    # ---- requests ---------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> Request:
        """Start one request; returns at once. `generate` is built on this."""
        if self._closed:
            raise RuntimeError("this LLM has been shut down")
        params = msgspec.structs.replace(params or SamplingParams())  # the caller's object stays untouched
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.model_config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context limit is {self.max_model_len}")
        if params.seed is None:
            params.seed = secrets.randbits(62)
        with self._lock:
            if not self._requests:
                self._progress = time.monotonic()  # an idle cluster has not stalled: its clock starts now
            loads = {name: 0 for name in self._live_attention()}
            for r in self._requests.values():
                if r.worker in loads:
                    loads[r.worker] += 1
            worker = self._place(loads)
            req = Request(f"req-{next(self._ids)}", text, ids, params, worker,
                          detok=Detokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output))
            self._requests[req.req_id] = req
            if not worker:  # no attention worker up right now: placed as soon as one is
                self._orphans.append(req)
                return req
        self._send(worker, P.AddRequest(req.req_id, ids, params))
        return req

    def _place(self, loads: dict[str, int]) -> str:
        """The attention worker for a new request. `spread`: the least loaded. `pack`: the first
        with room for a whole batch, so that, when workers share cores, requests batch on one
        (a step's cost barely grows with its batch) and the others stand by: they hold no
        requests, cost memory, not compute, and take a failed worker's requests at once."""
        if not loads:
            return ""
        if self.placement == "pack":
            room = [n for n in sorted(loads) if loads[n] < self.config.max_num_seqs]
            if room:
                return room[0]
        return min(loads, key=lambda n: (loads[n], n))

    def advance(self, req: Request) -> int:
        """Decode the request's new tokens (each once); a stop string ends the request here.
        Returns how many of its tokens count as output (those up to the stop string)."""
        n = len(req.tokens)  # the I/O thread appends meanwhile: read up to here, without a copy
        if req.detok.update(req.tokens, n):
            if req.stop_reason is None:
                req.stop_reason = req.detok.stop_reason
                if not req.done.is_set():
                    self.abort(req)
                req.finish_reason = "stop"
        elif req.done.is_set() and req.finish_reason == "stop" and n and req.tokens[n - 1] in (req.params.stop_token_ids or ()):
            req.stop_reason = req.tokens[n - 1]
        return req.detok.consumed if isinstance(req.stop_reason, str) else n

    def wait(self, req: Request, timeout: float | None = None) -> RequestOutput:
        if not req.done.wait(timeout):
            raise TimeoutError(f"{req.req_id} not finished after {timeout}s")
        n = self.advance(req)
        return RequestOutput(
            req.req_id, req.prompt, req.prompt_ids, req.tokens[:n], req.detok.text, req.finish_reason, req.times[:n],
            req.prompt_logits, req.logprobs[:n] if req.params.logprobs is not None else None, req.stop_reason, req.error,
        )

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, timeout: float | None = None) -> list[RequestOutput]:
        """Run every prompt (strings or token-id lists) to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        if any(r.params.stop for r in reqs):  # watch the text as it comes, to stop at a stop string
            self._until_stopped(reqs, timeout)
        return [self.wait(r, timeout) for r in reqs]

    def _until_stopped(self, reqs: list[Request], timeout: float | None) -> None:
        wake = threading.Event()
        for r in reqs:
            r.listener = wake.set
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(r.done.is_set() for r in reqs):
            wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            wake.clear()
            for r in reqs:
                self.advance(r)
            if deadline is not None and time.monotonic() > deadline:
                return  # wait() raises the timeout

    def abort(self, req: Request) -> None:
        with self._lock:
            self._requests.pop(req.req_id, None)
        req.finish_reason = req.finish_reason or "abort"
        req.done.set()
        self._send("", P.AbortRequest([req.req_id]))  # tells the I/O thread (below) to stop watching it
        if req.listener:
            req.listener()
        # An orphan (its worker failed) has no worker to tell, but may have a checkpoint: "*" asks
        # the I/O thread for any live attention worker, now or once there is one, to pass the
        # abort on to the store, which drops it.
        self._send(req.worker if req.worker in self._live_attention() else "*", P.AbortRequest([req.req_id]))

    def health(self) -> tuple[bool, str]:
        """Whether the cluster serves, and proves it: (ok, why not). Unhealthy while requests wait
        and no token came for `progress_timeout_s`, or the orchestrator is gone or silent."""
        if self._closed or self._state is None:
            return False, "the cluster is not running"
        if not self._io.is_alive():
            return False, "the driver's I/O thread died"
        if self._orch.poll() is not None:
            return False, "the orchestrator is gone (a successor is starting)"
        if not self._orch_heard:
            return False, "the orchestrator was replaced and its successor has not reported yet"
        silent = time.monotonic() - self._orch_seen
        if silent > self.orchestrator_timeout_s / 2:  # stale: said before it is replaced, at orchestrator_timeout_s
            return False, f"the orchestrator has been silent for {silent:.1f} s"
        stalled = self.stalled_for()
        if stalled > self.progress_timeout_s:
            return False, f"requests are waiting and no token has come for {stalled:.1f} s"
        if not self._live_attention():
            return False, "no attention worker is up"
        if self._state.unavailable_experts:
            return False, f"{self._state.unavailable_experts} experts have no live copy (waiting for a replacement)"
        return True, "ok"

    def accepting(self) -> tuple[bool, str]:
        """Whether new requests are taken (else a server answers 503): not while the cluster has
        stalled (requests waiting, no token for `progress_timeout_s`) or the driver cannot run."""
        if self._closed:
            return False, "the LLM has been shut down"
        if not self._io.is_alive():
            return False, "the driver's I/O thread died"
        stalled = self.stalled_for()
        if stalled > self.progress_timeout_s:
            return False, f"requests are waiting and no token has come for {stalled:.1f} s"
        return True, "ok"

    def stalled_for(self) -> float:
        """Seconds since the cluster last made progress while requests wait (0 when none wait)."""
        with self._lock:
            waiting = bool(self._requests)
        return time.monotonic() - self._progress if waiting else 0.0

    def workers(self) -> list[WorkerInfo]:
        out = [WorkerInfo("orchestrator", "orchestrator", self._orch.pid, _pid_alive(self._orch.pid),
                          "ready" if self._orch.poll() is None else "stopped", _rss(self._orch.pid))]
        for w in self._state.workers if self._state else []:
            is_aw = w.role == "attention"
            out.append(WorkerInfo(
                w.name, w.role, w.pid, _pid_alive(w.pid), w.state, _rss(w.pid),
                kv_blocks_used=self._kv_used.get(w.name, 0) if is_aw else None,
                kv_blocks_total=w.info.get("kv_blocks") if is_aw else None,
                expert_bytes=w.info.get("expert_bytes"), shadow_bytes=w.info.get("shadow_bytes"), replaces=w.replaces,
                info=dict(w.info),
            ))
        return out

    # ---- recovery (runs on the I/O thread) ----------------------------------------------

    def _on_cluster_state(self, state: P.ClusterState) -> None:
        old = {w.name: w.state for w in self._state.workers} if self._state else {}
        self._state = state
        self._probes.sync(state.workers, time.monotonic())
        self.slot_of.update((w.name, w.replaces or w.name) for w in state.workers)
        newly_failed = [w for w in state.workers if w.state == "failed" and old.get(w.name, "failed") != "failed"]
        if newly_failed or state.epoch != self._epoch:
            self._watch_failure()
            for w in newly_failed:
                self.failures[w.role] = self.failures.get(w.role, 0) + 1
            if state.epoch != self._epoch:
                self.failures["any (restart)"] = self.failures.get("any (restart)", 0) + 1
        if state.epoch != self._epoch:  # `restart`: every worker is new; rerun everything
            self._epoch = state.epoch
            self._hello.clear()
            with self._lock:
                orphans = list(self._requests.values())
            for req in orphans:
                req.skip = len(req.tokens)
            self._orphans = orphans
            return
        for w in state.workers:
            if w.role == "attention" and w.state == "failed" and old.get(w.name) != "failed":
                self._hello.discard(w.name)
                with self._lock:
                    self._orphans += [r for r in self._requests.values() if r.worker == w.name]
        self._place_orphans()

    def _on_drained(self, worker: str) -> None:
        """A draining attention worker has stopped, its KV committed: move its requests now (they
        restore from the store), then let the orchestrator shut it down."""
        self._hello.discard(worker)  # never placed on again
        self._draining.add(worker)
        with self._lock:
            moved = [r for r in self._requests.values() if r.worker == worker]
            self._orphans += moved
        if moved:
            self._watch_failure()
        self._place_orphans()
        self._route("orchestrator", P.Drained(worker))

    def _watch_failure(self) -> None:
        """Measure the stall of a failure (or drain): each streaming request's gap across it."""
        with self._lock:
            last = {r.req_id: r.times[-1] for r in self._requests.values() if r.times}
        if last:
            self._stall_watch.append((last, [0.0]))

    def _watch_stall(self, req_id: str, now: float, counts: bool = True) -> None:
        for last, worst in list(self._stall_watch):
            if req_id in last:
                gap = now - last.pop(req_id)
                worst[0] = max(worst[0], gap if counts else 0.0)
                if not last:
                    self._stall_watch.remove((last, worst))
                    self.stalls.append(worst[0])
                    self._route("orchestrator", P.Report("stall", "driver", "largest token gap across the failure, over all streams",
                                                         worst[0] * 1000))

    def _live_attention(self) -> list[str]:
        if not self._state or (self._epoch and not self._state.ready):
            return []
        return [w.name for w in self._state.workers
                if w.role == "attention" and w.state == "ready" and w.name in self._hello and w.name not in self._draining]

    def _place_orphans(self) -> None:
        """Reassign requests of failed attention workers round-robin to healthy ones."""
        live = self._live_attention()
        if self._pending_aborts and live:  # the store drops a checkpoint only for its owner: hand it over first
            self._route("orchestrator", P.Handover(self._pending_aborts, live[0]))
            if self._route(live[0], P.AbortRequest(self._pending_aborts)):
                self._pending_aborts = []
        if not self._orphans or not live:
            return
        if self._epoch and len(live) < sum(w.role == "attention" for w in self._state.workers):
            return  # after a restart, rerun everything once every attention worker is back
        store_ok = any(w.role == "store" and w.state == "ready" for w in self._state.workers)
        with self._lock:
            orphans = sorted({r.req_id: r for r in self._orphans}.values(), key=lambda r: int(r.req_id.split("-")[1]))
            self._orphans = []
        placed, recomputed = 0, 0
        self._hand_over(orphans, live)
        for i, req in enumerate(orphans):
            if req.done.is_set():
                continue
            worker = live[i % len(live)]
            params = msgspec.structs.replace(req.params, prompt_logits=False)
            restore = False
            if req.skip:  # `restart`: from the prompt, as if new
                msg = P.AddRequest(req.req_id, req.prompt_ids, params)
            else:
                restore = self.recovery == "tarragon" and store_ok
                msg = P.ResumeRequest(req.req_id, req.prompt_ids, list(req.tokens), params, restore, self.recovery == "replay")
            if not self._route(worker, msg):  # died since its last word: placed again at the next state
                self._hello.discard(worker)
                with self._lock:
                    self._orphans.append(req)
                continue
            req.worker, placed = worker, placed + 1
            self.reassigned["rerun" if req.skip else "restored" if restore else "recomputed"] += 1
            if req.tokens and not restore:
                recomputed += len(req.prompt_ids) + len(req.tokens)
        if placed:
            self.recomputed.append({"t": time.monotonic(), "requests": placed, "tokens": recomputed, "policy": self.recovery})
            self._route("orchestrator", P.Report("requests_reassigned", "driver", f"{placed} requests to {', '.join(live)} ({self.recovery})", 0.0))

    def _hand_over(self, orphans: list[Request], live: list[str]) -> None:
        """Tell the store (through the orchestrator) who owns each moved request from now on, so
        it lets the new owner restore and write it; sent before the requests themselves."""
        owners: dict[str, list[str]] = {}
        for i, req in enumerate(orphans):  # the placement `_place_orphans` makes next
            if not req.done.is_set() and not req.skip:
                owners.setdefault(live[i % len(live)], []).append(req.req_id)
        for owner, req_ids in owners.items():
            self._route("orchestrator", P.Handover(req_ids, owner))

    def stats(self) -> dict[str, int]:
        return {"expert_calls_replayed": sum(self._replayed.values())}

    # ---- supervision (runs on the I/O thread) ------------------------------------------------

    def _supervise(self, now: float) -> None:
        """Replace a dead or silent orchestrator; end requests the cluster cannot serve."""
        if self._closed or now < self._next_check:
            return
        self._next_check = now + 0.05
        stalled = self.stalled_for()
        if stalled > self.stall_timeout_s:
            with self._lock:
                pending = list(self._requests.values())
            log.error("no token for %.0f s: ending %d requests with an error", stalled, len(pending))
            for req in pending:
                self._end_with_error(req, f"the cluster produced no token for {stalled:.0f} s")
                self._watch_stall(req.req_id, now, counts=False)
                if not (req.worker in self._live_attention() and self._route(req.worker, P.AbortRequest([req.req_id]))):
                    self._pending_aborts.append(req.req_id)
        if not self._serving:
            return
        with self._lock:
            owing = {r.worker for r in self._requests.values()}
        for report in self._probes.check(owing & set(self._live_attention()), now):
            log.warning("attention worker %s: %s", report.worker, report.reason)
            self._route("orchestrator", report)
        dead = self._orch.poll() is not None
        silent = now - self._orch_seen > max(self.orchestrator_timeout_s, 10.0 if now - self._orch_started < 10.0 else 0.0)
        if not (dead or silent) or self._cluster.launcher == "ray" or self._state is None:
            return  # Ray's workers are actors of their orchestrator's Ray job: they share its fate
        why = f"the orchestrator (pid {self._orch.pid}) " + (f"exited ({self._orch.returncode})" if dead else
                                                              f"was silent for {now - self._orch_seen:.1f} s")
        log.error("%s: starting a successor", why)
        self._orch.kill()  # fence a hung one: two must never act at once
        self._orch.wait()
        self.orchestrator_restarts += 1
        self.failures["orchestrator"] = self.failures.get("orchestrator", 0) + 1
        st = self._state
        spec = msgspec.structs.replace(self._cluster, adopt=list(st.workers), table_version=st.table_version, epoch=st.epoch,
                                       next_index=dict(st.next_index), fenced=list(st.fenced), replaced=why)
        self._orch = _spawn(self._launcher.start, "tarragon.orchestrator", "orchestrator", spec)
        self._orch_started = self._orch_seen = time.monotonic()
        self._orch_heard = False

    def _end_with_error(self, req: Request, why: str) -> None:
        """End a request the cluster cannot serve: its waiter wakes, its stream gets the error."""
        with self._lock:
            if self._requests.pop(req.req_id, None) is None:
                return
        req.error, req.finish_reason = why, "error"
        req.done.set()
        if req.listener:
            req.listener()

    # ---- the I/O thread -------------------------------------------------------------------

    def _send(self, worker: str, header: P.Msg, *tensors: torch.Tensor) -> None:
        with self._lock:
            if not self._outbox.closed:
                self._outbox.send_multipart([worker.encode(), *P.encode(header, *tensors)])

    def _route(self, worker: str, header: P.Msg) -> bool:
        """Send from the I/O thread; False if `worker` cannot be reached (it is gone)."""
        try:
            self._router.send_multipart([worker.encode(), *P.encode(header)])
            return True
        except zmq.ZMQError as e:
            log.warning("cannot send to %s: %s", worker, e)
            return False

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._outbox_in, zmq.POLLIN)
        while True:
            events = dict(poller.poll(100))
            try:
                if self._outbox_in in events and not self._on_outbox(self._outbox_in.recv_multipart()):
                    break
                # Drain what is queued before judging the orchestrator: its state may wait behind tokens.
                for _ in range(10_000 if self._router in events else 0):
                    try:
                        got = recv(self._router, FROM_CLUSTER, "driver", zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if got is not None:
                        self._on_message(got)
                self._supervise(time.monotonic())
            except Exception:  # a handler's bug must never take the driver down: log it, go on
                log.exception("driver I/O thread: error in a handler (survived)")
        self._probes.close()
        self._router.close(0)
        self._outbox_in.close(0)

    def _on_outbox(self, frames: list[bytes]) -> bool:
        """A message from another thread; False once shutdown() is done with the workers."""
        if frames == [b""]:
            return False
        if frames[0] == b"":  # an aborted request: not a stream to measure any more
            for req_id in P.decode(frames[1:])[0].req_ids:
                self._watch_stall(req_id, time.monotonic(), counts=False)
            return True
        if frames[0] == b"*":  # an orphan's abort: to any live attention worker, for the store
            self._pending_aborts += P.decode(frames[1:])[0].req_ids
            self._place_orphans()
            return True
        try:
            self._router.send_multipart(frames)
        except zmq.ZMQError as e:  # that worker is gone: nothing to deliver to
            log.warning("cannot send to %s: %s", frames[0].decode(errors="replace"), e)
        return True

    def _on_message(self, got: Received) -> None:
        now = time.monotonic()
        msg, bufs, sender = got.msg, got.bufs, got.sender
        if not self._in_standing(sender, msg):
            return drops.note("driver", sender, f"{type(msg).__name__} from a sender not entitled to it")
        if sender == "orchestrator":
            self._orch_seen, self._orch_heard = now, True
        else:
            self._probes.heard_from(sender, now)
        if isinstance(msg, P.ClusterState):
            self._on_cluster_state(msg)
        elif isinstance(msg, P.EventLog):
            self._replies.put(msg)
        elif isinstance(msg, P.Ready):
            self._hello.add(sender)
            self._place_orphans()
        elif isinstance(msg, P.Tokens):
            self._on_tokens(sender, msg, now)
        elif isinstance(msg, P.Drained) and msg.name == sender:
            self._on_drained(sender)
        elif isinstance(msg, P.PromptLogits):
            req = self._requests.get(msg.req_id)
            try:
                if req is None or req.worker != sender or len(bufs) != 1:
                    raise P.BadMessage(f"prompt logits of {msg.req_id}, not a request of {sender}, or not one frame")
                logits = P.to_tensor(msg.logits, bufs[0])
                if logits.shape != (len(req.prompt_ids), self.model_config.vocab_size):
                    raise P.BadMessage(f"prompt logits of shape {list(logits.shape)} for a prompt of {len(req.prompt_ids)}")
                req.prompt_logits = logits.float().clone()
            except P.BadMessage as e:
                drops.note("driver", sender, str(e))

    def _on_tokens(self, sender: str, msg: P.Tokens, now: float) -> None:
        self._kv_used[sender] = msg.kv_used
        self._replayed[sender] = msg.replayed
        for i, (req_id, tok, finish) in enumerate(zip(msg.req_ids, msg.tokens, msg.finish)):
            req = self._requests.get(req_id)
            if req is None or req.worker != sender:  # e.g. an answer from before a failover
                continue
            self._progress = now
            if req.skip:
                req.skip -= 1
                continue
            req.tokens.append(tok)
            req.times.append(now)
            if req.params.logprobs is not None:
                req.logprobs.append(msg.logprobs[i] if len(msg.logprobs) == len(msg.req_ids) else None)
            self._watch_stall(req_id, now)
            if finish:
                req.finish_reason = finish
                with self._lock:
                    self._requests.pop(req_id, None)  # abort() may have raced this final token
                req.done.set()
            if req.listener:
                req.listener()

    def _in_standing(self, sender: str, msg: P.Msg) -> bool:
        """Cluster state only from the orchestrator; the rest only from attention workers it has
        not declared failed (a Ready may come before the state that lists its sender)."""
        if isinstance(msg, (P.ClusterState, P.EventLog)):
            return sender == "orchestrator"
        record = next((w for w in self._state.workers if w.name == sender), None) if self._state else None
        if isinstance(msg, P.Ready):
            return msg.name == sender and msg.role == "attention" and (
                record.role == "attention" and record.state in ("starting", "ready") if record else len(self._hello) < 4096)
        return record is not None and record.role == "attention" and record.state in ("ready", "draining")


class AttentionProbes:
    """The driver's own evidence that an attention worker is gone. Heartbeats (1 s) would leave
    its streams stalled that long, and a host that vanishes sends no FIN to tell sooner: so an
    attention worker that owes tokens and has been quiet for `quiet_s` is probed on its liveness
    channel (answered by its liveness thread, even mid-step), and reported failed to the
    orchestrator once no answer came for `timeout_s`, which fences it and moves its requests."""

    def __init__(self, ctx: Context, quiet_s: float = 0.1, timeout_s: float = 0.3):
        self.ctx, self.quiet_s, self.timeout_s = ctx, quiet_s, timeout_s
        self.socks: dict[str, tuple[str, zmq.Socket]] = {}  # worker -> (its probe endpoint, our DEALER)
        self.heard: dict[str, float] = {}  # worker -> its last message or pong
        self.suspect: dict[str, float] = {}  # worker -> first unanswered probe
        self.sent: dict[str, float] = {}
        self.reported: set[str] = set()

    def heard_from(self, name: str, now: float) -> None:
        self.heard[name] = now
        self.suspect.pop(name, None)

    def sync(self, records: list[P.WorkerRecord], now: float) -> None:
        """Probe channels to the ready attention workers, closed for the others."""
        ready = {w.name: w.probe_endpoint for w in records if w.role == "attention" and w.state == "ready" and w.probe_endpoint}
        for name in [n for n, (ep, _) in self.socks.items() if ready.get(n) != ep]:
            self.socks.pop(name)[1].close(0)
        for name, endpoint in ready.items():
            if name not in self.socks:
                self.socks[name] = (endpoint, make_socket(self.ctx, zmq.DEALER, connect=endpoint, identity="driver"))
                self.heard.setdefault(name, now)

    def check(self, owing: set[str], now: float) -> list[P.WorkerFailed]:
        """Reports on the workers in `owing` (each holds requests) that stopped answering."""
        failed = []
        for name in owing & self.socks.keys() - self.reported:
            sock = self.socks[name][1]
            while sock.poll(0):
                if recv(sock, (P.Pong,), "driver (probes)") is not None:
                    self.heard_from(name, now)
            if now - self.heard.get(name, now) < self.quiet_s:
                continue
            since = self.suspect.setdefault(name, now)
            if now - since >= self.timeout_s:
                self.reported.add(name)
                failed.append(P.WorkerFailed(name, "driver", f"no token and no answer to probes for {(now - since) * 1000:.0f} ms",
                                             (now - since) * 1000))
            elif now - self.sent.get(name, 0.0) >= self.quiet_s / 2:
                self.sent[name] = now
                try:
                    sock.send_multipart(P.encode(P.Probe(int(now * 1e6))), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        return failed

    def close(self) -> None:
        for _, sock in self.socks.values():
            sock.close(0)
        self.socks.clear()


class _Spawner:
    """One daemon thread that starts the orchestrator. A child gets its parent-death signal when
    the thread that forked it exits: this one lives as long as the process, unlike the thread that
    created an LLM (a pool's thread, asyncio.to_thread) or a pool's thread (joined at exit)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="tarragon-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, args, future = self.jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def __call__(self, fn, *args):
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((fn, args, future))
        return future.result()


_spawn = _Spawner()


def _process_id(pid: int) -> str:
    """pid and start time: a process's identity even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid} {f.read().rsplit(')', 1)[-1].split()[19]}"
    except OSError:
        return f"{pid} ?"


def _remove_orphaned_run_dirs() -> None:
    """Run folders of drivers that were killed (SIGKILL leaves them) are removed at the next start."""
    for d in Path(tempfile.gettempdir()).glob("tarragon-*"):
        try:
            owner = (d / "driver").read_text()
        except OSError:
            continue  # not ours to judge (no marker: an older version's, or being created)
        if _process_id(int(owner.split()[0])) != owner:
            shutil.rmtree(d, ignore_errors=True)


# What the driver accepts on its socket (who may send each is checked in `_in_standing`).
FROM_CLUSTER = (P.ClusterState, P.EventLog, P.Ready, P.Tokens, P.PromptLogits, P.Drained)


def _cluster_key(run_dir: Path, key_file: str | None, insecure: bool) -> tuple[ClusterKey | None, str]:
    """The cluster's CURVE key and the file the orchestrator reads it from: `key_file` if it
    exists (workers that join by hand hold a copy), else a new key written there (0600), or in
    the 0700 run folder when no file is named."""
    if insecure:
        return None, ""
    path = Path(key_file) if key_file else run_dir / "cluster.key"
    if path.exists():
        return ClusterKey.load(path), str(path)
    key = ClusterKey.generate()
    key.save(path)
    return key, str(path)


def _visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES ids, so each worker can be given one of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g for g in visible.split(",") if g] if visible is not None else [str(i) for i in range(torch.cuda.device_count())]
    if not ids:
        raise ValueError("device='cuda' but no GPU is visible")
    return ids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

"""The driver's public API: `LLM`, the user's handle on a cluster of worker processes.

`LLM(...)` resolves its arguments into one configuration tree (engine_args.py), then its
`ClusterClient` launches the orchestrator, which launches the expert workers, the checkpoint
stores and the attention workers. Requests are placed on attention workers and their tokens
collected by the client's I/O thread; what a failure does to them is recovery.py's; text and
stop strings are outputs.py's; failure figures are stats.py's.
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from . import protocol as P
from .cluster_client import ClusterClient
from .engine_args import EngineArgs
from .launcher import LocalLauncher, pid_alive
from .outputs import Request, RequestOutput, advance, output
from .procfs import rss
from .routing_table import RoutingTable
from .sampling import SamplingParams
from .tokenizer import Detokenizer, Tokenizer
from .vocabulary import RecoveryPolicy, Role, WorkerState

__all__ = ["LLM", "Request", "RequestOutput", "WorkerInfo"]
WARMUP_TOKENS = 1024  # prompt tokens of the warm-up batch at most (see LLM._warm_up)


@dataclass
class WorkerInfo:
    name: str
    role: Role
    pid: int
    alive: bool  # the process exists (a stopped process is alive)
    state: WorkerState  # the orchestrator's view
    rss_bytes: int
    kv_blocks_used: int | None = None
    kv_blocks_total: int | None = None
    expert_bytes: int | None = None  # expert weights held, shadows included
    shadow_bytes: int | None = None  # of which inactive shadow copies
    replaces: str = ""
    info: dict = field(default_factory=dict)  # what the worker reports (e.g. the store's byte accounting)


class LLM:
    """`LLM(model, **kwargs)`: kwargs are `EngineArgs`' fields (workers, device, dtype, shadows,
    recovery, timeouts, ...; see engine_args.py)."""

    def __init__(self, model: str | Path | None = None, **kwargs):
        self.config, self.model_config = EngineArgs(model=model, **kwargs).create_config()
        self.tokenizer = Tokenizer(self.config.model.path)
        self._ids = itertools.count()
        self._closed = False
        self.client = ClusterClient(self.config, self.model_config)
        atexit.register(self.shutdown)
        try:
            self.client.start()
            if self.config.cluster.warmup:
                self._warm_up()
        except BaseException:
            self.shutdown()
            raise

    def _warm_up(self) -> None:
        """One batch as large as the scheduler runs (`max_num_seqs` prompts, up to WARMUP_TOKENS
        in all), two tokens each, before the first request, as vLLM runs a dummy batch at start:
        every process on the datapath grows its heap, makes its kernels' plans and touches its
        buffers for that size once, here. Without it, the first runs of 8-64 requests after
        start-up were 8-25 % slower than the next ones (a 32-request prefill took 102 ms, 39 ms
        the second time)."""
        s = self.config.scheduler
        n = max(1, min(s.max_num_seqs, s.max_num_batched_tokens))
        length = min(max(1, min(s.max_num_batched_tokens, WARMUP_TOKENS) // n), s.max_model_len - 2)
        if length < 1:
            return
        vocab = self.model_config.vocab_size
        prompts = [[(7 * i + j) % vocab for j in range(length)] for i in range(n)]
        self.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))

    # ---- what it was built with (read-only) -------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    @property
    def recovery(self) -> RecoveryPolicy:
        return self.config.resilience.recovery

    @property
    def shadows(self) -> int:
        return self.config.resilience.shadows

    @property
    def placement(self) -> str:
        return self.config.cluster.placement

    @property
    def plan(self) -> RoutingTable:
        """Version 0 of the routing table: primaries and shadows."""
        return self.client.plan

    @property
    def run_dir(self) -> Path:
        """The private folder of this run: sockets, key, logs (removed at shutdown)."""
        return self.client.run_dir

    @property
    def launcher(self) -> LocalLauncher:
        """Where local workers' endpoints and logs are."""
        return self.client.launcher

    # ---- what the cluster is doing (read-only) ----------------------------------------------------

    @property
    def alive(self) -> bool:
        """The driver can serve: its I/O thread runs."""
        return self.client.io.is_alive()

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not finished."""
        return len(self.client.requests)

    def in_flight(self) -> list[Request]:
        """The unfinished requests (a snapshot)."""
        with self.client.lock:
            return list(self.client.requests.values())

    @property
    def table_version(self) -> int:
        """The authoritative routing table's version (0 before the orchestrator reports)."""
        return self.client.state.table_version if self.client.state else 0

    @property
    def epoch(self) -> int:
        """Restarts of the whole cluster (recovery="restart")."""
        return self.client.epoch

    @property
    def orchestrator_pid(self) -> int:
        return self.client.orch.pid

    def live_attention(self) -> list[str]:
        """Attention workers taking requests now."""
        return self.client.live_attention()

    @property
    def slot_of(self) -> dict[str, str]:
        """Every worker seen -> the planned place it held (outlives its record)."""
        return self.client.slot_of

    @property
    def stalls(self) -> list[float]:
        return self.client.stats.stalls

    @property
    def failures(self) -> dict[str, int]:
        return self.client.stats.failures

    @property
    def reassigned(self) -> dict[str, int]:
        return self.client.stats.reassigned

    @property
    def recomputed(self) -> list[dict]:
        return self.client.stats.recomputed

    @property
    def orchestrator_restarts(self) -> int:
        return self.client.stats.orchestrator_restarts

    def stats(self) -> dict[str, int]:
        return {"expert_calls_replayed": self.client.stats.expert_calls_replayed()}

    # ---- lifecycle --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every worker process (politely, then by force) and release resources."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self.client.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- failures (tests and demos) and operations -----------------------------------------------

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
        role = next((w.role for w in self.workers() if w.name == name and w.state == WorkerState.READY), None)
        if role not in (Role.ATTENTION, Role.EXPERT):
            raise ValueError(f"{name!r} is not a ready attention or expert worker")
        self.client.send("orchestrator", P.Drain(name))

    def events(self, timeout: float = 5.0) -> list[P.Event]:
        """The orchestrator's event log: failures, detections, routing updates, replacements."""
        return self.client.events(timeout)

    # ---- requests ---------------------------------------------------------------------------------

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
        req = Request(f"req-{next(self._ids)}", text, ids, params, "",
                      detok=Detokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output))
        self.client.submit(req)
        return req

    def advance(self, req: Request) -> int:
        """Decode the request's new tokens (each once); a stop string ends the request here.
        Returns how many of its tokens count as output (those up to the stop string)."""
        return advance(req, self.abort)

    def wait(self, req: Request, timeout: float | None = None) -> RequestOutput:
        if not req.done.wait(timeout):
            raise TimeoutError(f"{req.req_id} not finished after {timeout}s")
        return output(req, self.advance(req))

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
        self.client.abort(req)

    # ---- health -----------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """Whether the cluster serves, and proves it: (ok, why not). Unhealthy while requests wait
        and no token came for `progress_timeout_s`, or the orchestrator is gone or silent."""
        c, r = self.client, self.config.resilience
        if self._closed or c.state is None:
            return False, "the cluster is not running"
        if not self.alive:
            return False, "the driver's I/O thread died"
        if c.orch.poll() is not None:
            return False, "the orchestrator is gone (a successor is starting)"
        if not c.orch_heard:
            return False, "the orchestrator was replaced and its successor has not reported yet"
        silent = time.monotonic() - c.orch_seen
        if silent > r.orchestrator_timeout_s / 2:  # stale: said before it is replaced, at orchestrator_timeout_s
            return False, f"the orchestrator has been silent for {silent:.1f} s"
        stalled = self.stalled_for()
        if stalled > r.progress_timeout_s:
            return False, f"requests are waiting and no token has come for {stalled:.1f} s"
        if not c.live_attention():
            return False, "no attention worker is up"
        if c.state.unavailable_experts:
            return False, f"{c.state.unavailable_experts} experts have no live copy (waiting for a replacement)"
        return True, "ok"

    def accepting(self) -> tuple[bool, str]:
        """Whether new requests are taken (else a server answers 503): not while the cluster has
        stalled (requests waiting, no token for `progress_timeout_s`) or the driver cannot run."""
        if self._closed:
            return False, "the LLM has been shut down"
        if not self.alive:
            return False, "the driver's I/O thread died"
        stalled = self.stalled_for()
        if stalled > self.config.resilience.progress_timeout_s:
            return False, f"requests are waiting and no token has come for {stalled:.1f} s"
        return True, "ok"

    def stalled_for(self) -> float:
        """Seconds since the cluster last made progress while requests wait (0 when none wait)."""
        return self.client.stalled_for()

    def workers(self) -> list[WorkerInfo]:
        orch = self.client.orch
        out = [WorkerInfo(name="orchestrator", role=Role.ORCHESTRATOR, pid=orch.pid, alive=pid_alive(orch.pid),
                          state=WorkerState.READY if orch.poll() is None else WorkerState.STOPPED, rss_bytes=rss(orch.pid))]
        state, kv_used = self.client.state, self.client.stats.kv_used
        for w in state.workers if state else []:
            is_aw = w.role == Role.ATTENTION
            out.append(WorkerInfo(
                name=w.name, role=w.role, pid=w.pid, alive=pid_alive(w.pid), state=w.state, rss_bytes=rss(w.pid),
                kv_blocks_used=kv_used.get(w.name, 0) if is_aw else None, kv_blocks_total=w.info.get("kv_blocks") if is_aw else None,
                expert_bytes=w.info.get("expert_bytes"), shadow_bytes=w.info.get("shadow_bytes"), replaces=w.replaces,
                info=dict(w.info),
            ))
        return out

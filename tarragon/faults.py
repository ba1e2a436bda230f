"""Faults: what one is (a spec such as `kill:expert:1@2s`), putting one into a live cluster, and
the stall it caused.

One module because the CLI (`generate --failover`), `tarragon bench`, the bench/ scripts and the
tests must mean the same thing by each of these words: before, "stall" had a definition in each
of them and their figures could not be compared. Nothing here starts a process or a server.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .vocabulary import Role, WorkerState

SETTLE_S = 1.0  # a token gap that starts this soon after a fault counts towards its stall


# ---- what a fault is ----------------------------------------------------------------------------


class FaultAction(StrEnum):
    """How a worker is hit: KILL dies at once (its sockets close); HANG stops answering (SIGSTOP,
    found only by probes and heartbeats)."""

    KILL = "kill"
    HANG = "hang"

    @property
    def signal(self) -> signal.Signals:
        return signal.SIGKILL if self is FaultAction.KILL else signal.SIGSTOP


_SPEC = re.compile(r"(?:(kill|hang):)?(expert|attention):(\d+)@(\d+(?:\.\d*)?)(s|ms)?")


@dataclass
class Fault:
    """`expert:1@20s`: SIGKILL the expert worker at index 1 (of those live then) 20 s into the
    run; `hang:attention:0@5s` sends SIGSTOP instead."""

    role: Role
    index: int
    at_s: float
    action: FaultAction = FaultAction.KILL

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        m = _SPEC.fullmatch(spec.strip())
        if not m:
            raise ValueError(f"bad --fault {spec!r}: expected [kill:|hang:]expert|attention:INDEX@SECONDS, e.g. expert:1@20s")
        action, role, index, at, unit = m.groups()
        return cls(Role(role), int(index), float(at) / (1000 if unit == "ms" else 1), FaultAction(action or "kill"))

    def __str__(self) -> str:
        return f"{'hang:' if self.action == FaultAction.HANG else ''}{self.role}:{self.index}@{self.at_s:g}s"


# ---- what a fault cost --------------------------------------------------------------------------


def stall_s(streams: Iterable[Sequence[float]], t_fault: float, settle_s: float = SETTLE_S) -> float:
    """THE stall of a fault, the one figure every report gives: the largest gap between two
    consecutive tokens of one stream, among the streams that were streaming at the fault (first
    token before it), over the gaps that end after the fault and start before `t_fault +
    settle_s` (the gap across the fault, and those of the recovery right after it).

    `streams` are token (or chunk) arrival times on the clock of `t_fault`. A stream that had not
    started streaming shows the fault in its time to first token instead. 0.0 when no stream
    qualifies. A client, which knows the fault time only roughly, uses the default settle; the
    driver, which opens its watch at the moment it learns of the failure, uses 0 (`StallWatch`)."""
    return max((b - a for times in streams if len(times) and times[0] < t_fault
                for a, b in zip(times, times[1:]) if b > t_fault and a < t_fault + settle_s), default=0.0)


def largest_gap_s(streams: Iterable[Sequence[float]], before: float = float("inf")) -> float:
    """The largest gap between consecutive tokens of any of `streams`, over the gaps that end
    before `before`: what a stall is compared with (a failure-free run's own hiccups)."""
    return max((b - a for times in streams for a, b in zip(times, times[1:]) if b <= before), default=0.0)


class StallWatch:
    """`stall_s(..., settle_s=0)` computed as tokens arrive, for the driver, which cannot keep
    every stream's history: opened at the moment a failure is known with each streaming request's
    last token time, fed each request's next token (or its end without one), it gives the stall
    once every request it watches has been heard from."""

    def __init__(self, last_token_t: dict[str, float]):
        self.waiting = dict(last_token_t)  # request -> its last token before the failure
        self.worst = 0.0

    def token(self, req_id: str, now: float, counts: bool = True) -> float | None:
        """`req_id`'s first token after the failure came at `now` (`counts=False`: the request
        ended without one, e.g. aborted); returns the stall when this was the last one awaited."""
        last = self.waiting.pop(req_id, None)
        if last is None:
            return None
        if counts:
            self.worst = max(self.worst, now - last)
        return None if self.waiting else self.worst


# ---- putting a fault into a live cluster -------------------------------------------------------


def inject(llm, role: str, index: int, action: str = FaultAction.KILL):
    """SIGKILL (KILL) or SIGSTOP (HANG) the `index`-th live ready worker of `role`, in registry
    order; returns it and the moment (this host's time.monotonic()). IndexError when fewer are
    live (a previous fault's replacement may still be starting)."""
    live = [w for w in llm.workers() if w.role == role and w.state == WorkerState.READY and w.alive]
    if index >= len(live):
        raise IndexError(f"there are {len(live)} live {role} workers now; index {index} is out of range")
    victim, t = live[index], time.monotonic()
    llm.kill(victim.name, FaultAction(action).signal)  # a hung worker is fenced by SIGKILL
    return victim, t



def kill_under_load(llm, prompts, params, reference, role: str) -> dict:
    """Rerun `prompts` on `llm` and SIGKILL a worker of `role` (an attention worker that holds
    requests) a third of the way in. Returns the victim, when it was killed, the events since,
    the stall (`stall_s`) beside the largest gap before the fault, and whether every output
    equals `reference` (a failure-free run of the same prompts)."""
    reqs = [llm.submit(p, params) for p in prompts]
    while min(len(r.tokens) for r in reqs) < max(1, params.max_tokens // 3):
        time.sleep(0.001)
    busy = {r.worker for r in reqs if not r.done.is_set()}
    victim = next(w.name for w in llm.workers()
                  if w.role == role and w.state == WorkerState.READY and (role == Role.EXPERT or w.name in busy))
    seen = len(llm.events())
    killed_at = time.monotonic()
    llm.kill(victim)
    outs = [llm.wait(r, 300) for r in reqs]
    deadline = time.monotonic() + 120
    while any(w.state == WorkerState.STARTING for w in llm.workers()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the replacement joins before the next measurement
    streams = [o.token_times for o in outs]
    return {"victim": victim, "killed_at": killed_at, "events": llm.events()[seen:], "stall_ms": 1000 * stall_s(streams, killed_at),
            "gap_before_ms": 1000 * largest_gap_s(streams, before=killed_at),
            "tokens_identical": [o.token_ids for o in outs] == [o.token_ids for o in reference]}

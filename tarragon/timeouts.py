"""Failure-detection timeouts that adapt to the latency the cluster shows, and the gray-failure
test (a worker much slower than its peers). Every setting is here, in one place.

Why adaptive: a fixed timeout (100 ms) fails healthy workers whenever the whole machine slows
down (other jobs on the same cores: every round trip stretches). The timeout is therefore
`max(floor, K x the Q-quantile of recent round trips over all peers)`, capped: a uniformly slow
machine raises it for everybody (no false failure), while a dead or stopped peer is still caught
within `floor` on a quiet machine, and within `cap` on the busiest one.

Why the process state is read before a heartbeat failure (local workers): a worker silent past
the timeout whose threads are runnable (state R in /proc) is waiting for a CPU, not hung; it gets
up to HEARTBEAT_CAP_S. A stopped (SIGSTOP) or deadlocked one is not runnable and fails at once.

Why relative for gray failures: a worker that still answers, but slowly (e.g. stopped 80 ms of
every 100 ms), passes every timeout. It is failing when its own recent latency is many times its
peers' for a sustained window; when the whole machine is slow, its peers are slow too, and the
ratio stays near 1.

Used by the forwarding engine (probe timeouts, expert-worker round trips) and the orchestrator
(heartbeat timeouts, heartbeat gaps).
"""

from __future__ import annotations

import collections
import os
import statistics
import time

# ---- adaptive timeouts ------------------------------------------------------------------
WINDOW = 256  # recent samples (round trips or heartbeat gaps, all peers together) ...
MAX_AGE_S = 10.0  # ... of the last this many seconds: once a burst of load is over, back to the floor
QUANTILE = 0.99  # the high percentile of recent samples the timeout is a multiple of
K = 4.0  # timeout = K x that percentile (at least the floor: the configured timeout)
PROBE_CAP_S = 2.0  # a probe timeout never grows past this: a stopped worker is caught within it
HEARTBEAT_CAP_S = 10.0  # likewise for heartbeats

# ---- gray failures (slow, not dead) -------------------------------------------------------
GRAY_WINDOW_S = 1.0  # latencies are averaged per worker over this sliding window
GRAY_MIN_SAMPLES = 10  # a worker's average counts once its window holds this many replies
GRAY_RATIO = 4.0  # a worker whose average is this many times its peers' median average ...
GRAY_MIN_S = 0.02  # ... and above this in absolute terms (tiny latencies are noise) ...
GRAY_SUSTAIN_S = 1.0  # ... continuously for this long (so ~2 s of evidence in all), is failing
# Heartbeat lateness (the orchestrator's test, any role): steadier than replies but noisier under
# load (a busy machine delays single beats by tens of ms), so a higher bar, held longer. A worker
# stopped 80 ms in every 100 ms sends its beats ~50 ms late on average.
GRAY_HEARTBEAT_MIN_S = 0.03
GRAY_HEARTBEAT_SUSTAIN_S = 2.0


def runnable(pid: int) -> bool:
    """Whether any thread of local process `pid` is runnable (wants a CPU): starved, not hung."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "R":
                    return True
        except (OSError, IndexError):
            continue
    return False


class AdaptiveTimeout:
    """`floor` or K x the QUANTILE of the last WINDOW samples (at most MAX_AGE_S old), whichever
    is larger, capped."""

    def __init__(self, floor_s: float, cap_s: float):
        self.floor_s, self.cap_s = floor_s, max(cap_s, floor_s)
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=WINDOW)  # (when, seconds)
        self._value, self._dirty = floor_s, False

    def observe(self, seconds: float, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, seconds))
        self._dirty = True

    @property
    def value(self) -> float:
        old = time.monotonic() - MAX_AGE_S
        while self.samples and self.samples[0][0] < old:
            self.samples.popleft()
            self._dirty = True
        if self._dirty:  # recomputed at most once per batch of samples, when it is read
            self._dirty = False
            ordered = sorted(s for _, s in self.samples)
            q = ordered[min(len(ordered) - 1, int(QUANTILE * len(ordered)))] if ordered else 0.0
            self._value = min(self.cap_s, max(self.floor_s, K * q))
        return self._value


class GrayDetector:
    """Per-worker average latency over a sliding window; `slow()` names workers much slower than
    their peers for GRAY_SUSTAIN_S. Needs a peer with recent samples: one worker alone, or one
    whose peers are idle, is never judged. A window average, not a per-call figure: a worker
    stopped 80 ms in every 100 ms answers some calls at once and makes others wait 80 ms."""

    def __init__(self, what: str = "replies", min_s: float = GRAY_MIN_S, sustain_s: float = GRAY_SUSTAIN_S):
        self.what = what  # what the latencies are, for the verdict
        self.min_s, self.sustain_s = min_s, sustain_s
        self.samples: dict[str, collections.deque[tuple[float, float]]] = {}
        self.sums: dict[str, float] = {}
        self.slow_since: dict[str, float] = {}

    def observe(self, worker: str, seconds: float, now: float) -> None:
        q = self.samples.setdefault(worker, collections.deque())
        q.append((now, seconds))
        self.sums[worker] = self.sums.get(worker, 0.0) + seconds
        if self._outlier(worker, now):
            self.slow_since.setdefault(worker, now)
        else:
            self.slow_since.pop(worker, None)

    def mean(self, worker: str, now: float) -> float | None:
        """The worker's average latency over the window (None: too few samples)."""
        q = self.samples.get(worker)
        while q and q[0][0] < now - GRAY_WINDOW_S:
            self.sums[worker] -= q.popleft()[1]
        return self.sums[worker] / len(q) if q and len(q) >= GRAY_MIN_SAMPLES else None

    def _peers(self, worker: str, now: float) -> float | None:
        peers = [m for w in self.samples if w != worker and (m := self.mean(w, now)) is not None]
        return statistics.median(peers) if peers else None

    def _outlier(self, worker: str, now: float) -> bool:
        mine = self.mean(worker, now)
        if mine is None or mine <= self.min_s:  # (most replies: the peers are not even looked at)
            return False
        peers = self._peers(worker, now)
        return peers is not None and mine > GRAY_RATIO * peers

    def slow(self, now: float) -> list[tuple[str, str]]:
        """(worker, why) for each worker slow long enough to be treated as failing."""
        out = []
        for w, since in list(self.slow_since.items()):
            if now - since >= self.sustain_s and self._outlier(w, now):
                mine, peers = self.mean(w, now), self._peers(w, now)
                out.append((w, f"gray failure: {self.what} {mine * 1000:.0f} ms on average, {mine / peers:.0f}x its peers' "
                               f"({peers * 1000:.1f} ms), for {now - since + GRAY_WINDOW_S:.1f} s"))
        return out

    def forget(self, worker: str) -> None:
        for d in (self.samples, self.sums, self.slow_since):
            d.pop(worker, None)

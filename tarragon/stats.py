"""The driver's failure figures: failures seen by role, requests reassigned and the tokens
computed again to resume them, and per failure its stall (the largest gap between two tokens
it caused across every stream). Read by the server's /metrics and by `tarragon bench`."""

from __future__ import annotations

import time

from .faults import StallWatch
from .vocabulary import RecoveryPolicy


class DriverStats:
    def __init__(self) -> None:
        self.stalls: list[float] = []  # per failure: the largest token gap it caused across streams
        self.failures: dict[str, int] = {}  # failures seen, by role
        self.reassigned: dict[str, int] = {"restored": 0, "recomputed": 0, "rerun": 0}
        # Per reassignment (one per failure): when, how many requests, and the tokens computed again
        # to resume them: prompt + output for `recompute`/`replay` and for `restart` reruns. A
        # restore's uncommitted tail is known only to its new worker, which reports it ("restored").
        self.recomputed: list[dict] = []
        self.orchestrator_restarts = 0
        self.kv_used: dict[str, int] = {}  # attention worker -> KV blocks in use (its last Tokens)
        self.replayed: dict[str, int] = {}  # attention worker -> expert calls it replayed elsewhere
        self._watch: list[StallWatch] = []  # per failure under way

    def failed(self, role: str) -> None:
        self.failures[role] = self.failures.get(role, 0) + 1

    def reassignment(self, requests: int, tokens: int, policy: RecoveryPolicy) -> None:
        self.recomputed.append({"t": time.monotonic(), "requests": requests, "tokens": tokens, "policy": policy})

    def watch_failure(self, last_token_times: dict[str, float]) -> None:
        """Measure a failure's (or drain's) stall: each streaming request's gap across it."""
        if last_token_times:
            self._watch.append(StallWatch(last_token_times))

    def token(self, req_id: str, now: float, counts: bool = True) -> list[float]:
        """A request's next token (counts=False: it ended without one). Returns the stalls of the
        failures whose every stalled request has now moved on."""
        done = []
        for watch in list(self._watch):
            stall = watch.token(req_id, now, counts)
            if stall is not None:
                self._watch.remove(watch)
                self.stalls.append(stall)
                done.append(stall)
        return done

    def expert_calls_replayed(self) -> int:
        return sum(self.replayed.values())

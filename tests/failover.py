"""Helpers for failure tests: a standard load, token gaps, waiting for the cluster to heal."""

from __future__ import annotations

import re
import time

import msgspec

from conftest import prompts_of_lengths
from tarragon import SamplingParams
from tarragon.faults import largest_gap_s
from tarragon.vocabulary import EventKind, Role, WorkerState

LOAD_PROMPTS = prompts_of_lengths([4 + 3 * i for i in range(16)], 1024, seed=11)
LOAD_PARAMS = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
LONG = msgspec.structs.replace(LOAD_PARAMS, max_tokens=1900)  # outlive a test's faults, then aborted (assert_failure_free)


def max_gap(reqs_or_outs) -> float:
    """The largest token gap of any of these requests (live ones or finished outputs) over the
    whole run (`tarragon.faults.largest_gap_s`): a failure's stall is this minus a failure-free
    run's."""
    return largest_gap_s(getattr(r, "token_times", None) or r.times for r in reqs_or_outs)


def wait_until(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_replaced(llm, killed: str, timeout: float = 90.0) -> str:
    """Wait until a replacement holding `killed`'s place (its experts) is ready; returns its name."""
    slot = llm.slot_of[killed]  # its record may be gone: failed workers leave the registry

    def ready() -> list[str]:
        return [w.name for w in llm.workers() if w.replaces == slot and w.name != killed and w.state == WorkerState.READY]

    wait_until(ready, timeout, f"a replacement of {killed}")
    return ready()[0]


def run_with_fault(llm, inject, after_tokens: int = 50, prompts=LOAD_PROMPTS, params=LOAD_PARAMS):
    """Submit the load, call `inject()` once every request has `after_tokens` tokens (0: at
    once, during prefill), and return the finished outputs."""
    reqs = [llm.submit(p, params) for p in prompts]
    if after_tokens:
        wait_until(lambda: min(len(r.tokens) for r in reqs) >= after_tokens, 60, "tokens before the fault")
    inject()
    return [llm.wait(r, 180) for r in reqs]


def restored_tokens(llm, since: float) -> list[int]:
    """Tokens each restore since `since` took from a store (its event's `restored_tokens`)."""
    return [e.restored_tokens for e in llm.events() if e.kind == EventKind.RESTORED and e.t > since]


def assert_failure_free(llm, reqs, more: int = 20) -> None:
    """Once every request has `more` tokens beyond what it has now, abort them all: each one's
    tokens must be those of a failure-free run of as many tokens (requests long enough to outlive
    a test's faults, without a failure-free run of their full length first)."""
    want = [len(r.tokens) + more for r in reqs]
    wait_until(lambda: all(len(r.tokens) >= n for r, n in zip(reqs, want)), 120, "tokens after the faults")
    for r in reqs:
        llm.abort(r)
    got = [list(r.tokens) for r in reqs]
    assert all(len(g) < LONG.max_tokens for g in got), "requests ended before the test did"
    again = llm.generate([r.prompt_ids for r in reqs], [msgspec.structs.replace(LONG, max_tokens=len(g)) for g in got])
    assert [o.token_ids for o in again] == got


def wait_refilled(llm, reqs, since: float, timeout: float = 60.0) -> None:
    """Wait until every attention worker that holds one of `reqs` has re-filled the store that
    came up since `since`, and that store holds what they wrote (its own count, sent each 0.5 s)."""
    def done() -> bool:
        refills = [e for e in llm.events() if e.kind == EventKind.STORE_REFILLED and e.t > since]
        if not {r.worker for r in reqs} <= {e.worker for e in refills}:
            return False
        new = [w for w in llm.workers() if w.role == Role.STORE and w.state == WorkerState.READY and w.pid not in old]
        written = sum(int(re.search(r"(\d+) positions", e.detail).group(1)) for e in refills)
        return any(w.info.get("positions", 0) >= written for w in new)

    old = {w.pid for w in llm.workers() if w.role == Role.STORE and w.state == WorkerState.READY}
    try:
        wait_until(done, timeout, "every attention worker with requests refilled the new store")
    except AssertionError:
        raise AssertionError("no refill:\n" + "\n".join(f"{e.t:.2f} {e.kind} {e.worker} {e.detail[:90]}" for e in llm.events())) from None

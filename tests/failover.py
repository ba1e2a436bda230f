"""Helpers for failure tests: a standard load, token gaps, waiting for the cluster to heal."""

from __future__ import annotations

import time

from conftest import prompts_of_lengths
from tarragon import SamplingParams

LOAD_PROMPTS = prompts_of_lengths([4 + 3 * i for i in range(16)], 1024, seed=11)
LOAD_PARAMS = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


def max_gap(reqs_or_outs) -> float:
    times = [getattr(r, "token_times", None) or r.times for r in reqs_or_outs]
    return max(max(b - a for a, b in zip(t, t[1:])) for t in times if len(t) > 1)


def wait_until(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_replaced(llm, killed: str, timeout: float = 90.0) -> str:
    """Wait until a replacement holding `killed`'s place (its experts) is ready; returns its name."""
    slot = llm.slot_of[killed]  # its record may be gone: failed workers leave the registry

    def ready() -> list[str]:
        return [w.name for w in llm.workers() if w.replaces == slot and w.name != killed and w.state == "ready"]

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

"""Planned drain vs SIGKILL, and how fast a gray failure is caught (one LLM in this process).

    .venv/bin/python bench/drain.py [--model DIR] [--runs 3] [--out docs/results/drain.json]

For each of an attention worker and an expert worker (2 AW x 3 EW, shadows=1): the same load
(--prompts streams, --max-tokens each, greedy), with the worker drained (`LLM.drain`) or SIGKILLed
once every stream has --after tokens. Stall = `tarragon.faults.stall_s` with a settle time of 3 s:
the largest token gap, over all streams, among gaps that end after the fault and begin within 3 s
of it; beside it the failure-free run's median
inter-token gap, for scale; tokens are checked against the failure-free run. Then an expert
worker is cycled (SIGSTOP 80 ms / SIGCONT 20 ms) and the time until it is failed is measured.
Every fault waits for the cluster to heal (replacement ready) before the next. Medians of --runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.bench.experiments import experiment_header, write_results  # noqa: E402
from tarragon.faults import stall_s  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402
from tarragon.vocabulary import EventKind, Role, WorkerState  # noqa: E402


def gaps(outs) -> list[float]:
    """Inter-token gaps of every stream."""
    return [b - a for o in outs for a, b in zip(o.token_times, o.token_times[1:])]


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def healed(llm: LLM, slot: str) -> bool:
    return any(w.replaces == slot and w.state == WorkerState.READY for w in llm.workers())


def one_fault(llm: LLM, prompts, params, after: int, role: str, how: str) -> tuple[float, bool]:
    """Submit the load, hit a busy worker of `role` (drain or SIGKILL), return (stall s, tokens ok)."""
    reqs = [llm.submit(p, params) for p in prompts]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= after, 120, "tokens before the fault")
    victim = reqs[0].worker if role == Role.ATTENTION else next(w.name for w in llm.workers() if w.role == Role.EXPERT and w.state == WorkerState.READY)
    slot = llm.slot_of.get(victim, victim)
    t = time.monotonic()
    llm.drain(victim) if how == "drain" else llm.kill(victim)
    outs = [llm.wait(r, 300) for r in reqs]
    wait_until(lambda: healed(llm, slot) and not any(w.name == victim and w.alive for w in llm.workers()), 120, f"{victim} replaced")
    return stall_s([o.token_times for o in outs], t, settle_s=3.0), [o.token_ids for o in outs]


def cycled_detection(llm: LLM, prompts, params) -> float:
    """Seconds from the first SIGSTOP of an expert worker cycled 80/20 ms until it is failed."""
    victim = next(w for w in llm.workers() if w.role == Role.EXPERT and w.state == WorkerState.READY)
    reqs = [llm.submit(p, params) for p in prompts]
    wait_until(lambda: min(len(r.tokens) for r in reqs) >= 8, 120, "tokens")
    stop, t0 = threading.Event(), time.monotonic()

    def cycle() -> None:
        try:
            while not stop.is_set():
                os.kill(victim.pid, signal.SIGSTOP)
                time.sleep(0.08)
                os.kill(victim.pid, signal.SIGCONT)
                time.sleep(0.02)
        except ProcessLookupError:
            pass

    th = threading.Thread(target=cycle, daemon=True)
    th.start()
    try:
        wait_until(lambda: any(e.kind == EventKind.WORKER_FAILED and e.worker == victim.name for e in llm.events()), 60, "detection")
    finally:
        stop.set()
        th.join()
        try:
            os.kill(victim.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    t = next(e.t for e in llm.events() if e.kind == EventKind.WORKER_FAILED and e.worker == victim.name)
    for r in reqs:
        llm.wait(r, 300)
    wait_until(lambda: healed(llm, llm.slot_of.get(victim.name, victim.name)), 120, "replacement")
    return t - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--after", type=int, default=24, help="tokens every stream has when the fault comes")
    ap.add_argument("--out", default="docs/results/drain.json")
    args = ap.parse_args()
    model = args.model or str(demo_model())
    prompts = [[3 + (7 * i + j) % 900 for j in range(8 + 2 * i)] for i in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    record = experiment_header("planned drain vs SIGKILL; gray-failure detection", model,
                               f"{args.prompts} streams x {args.max_tokens} tokens, fault at {args.after} tokens; 2 AW x 3 EW, "
                               f"shadows=1; median of {args.runs}")
    cells: dict[str, list[float]] = {}
    mismatches = 0
    with LLM(model, attention_workers=2, expert_workers=3, shadows=1) as llm:
        base = llm.generate(prompts, params)
        base_tokens = [o.token_ids for o in base]
        cells["failure-free ITL"] = [statistics.median(gaps(base))]
        for run in range(args.runs):
            for role in (Role.ATTENTION, Role.EXPERT):
                for how in ("drain", "sigkill"):
                    gap, tokens = one_fault(llm, prompts, params, args.after, role, how)
                    mismatches += tokens != base_tokens
                    cells.setdefault(f"{role} {how}", []).append(gap)
                    print(f"run {run + 1} {role} {how}: stall {gap * 1000:.0f} ms", flush=True)
            cells.setdefault("gray detection", []).append(cycled_detection(llm, prompts, params))
            print(f"run {run + 1}: cycled expert worker failed after {cells['gray detection'][-1]:.2f} s", flush=True)
    med = statistics.median
    lines = [f"{'case (stall)':>18} | {'median ms':>9} | {'max ms':>7}"]
    lines += [f"{k:>18} | {med(v) * 1000:>9.0f} | {max(v) * 1000:>7.0f}" for k, v in cells.items()]
    lines.append(f"runs whose tokens differ from the failure-free run: {mismatches}")
    record.update(cells_s=cells, token_mismatches=mismatches)
    write_results(record, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()

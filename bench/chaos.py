"""Chaos soak (issue 15): a stream load runs while random processes of every kind are SIGKILLed or
hung, one after another, now and then two at once.

    .venv/bin/python bench/chaos.py [--faults 100] [--interval 3] [--model DIR] [--out docs/results/chaos.json] [--png]

One LLM (2 AW x 2 EW, shadows=1, replacements on: the standby capacity), `--streams` greedy requests
always in flight, cycling over fixed prompts whose failure-free outputs are taken first on the same
cluster. Every `--interval` seconds (jittered), once the cluster has healed from the previous fault
(every planned place ready, nothing stopped, `health()` ok; at most --heal-timeout s), a fault: a
live process of a random kind (attention worker, expert worker, checkpoint store, orchestrator) is
SIGKILLed, or SIGSTOPped and left stopped (the cluster must notice and fence it), or SIGSTOPped and
SIGCONTed 0.05-2 s later; with probability --double two processes at once.

Reports: requests failed (ended in error, or not ended --request-timeout s after submission; goal 0),
outputs differing from the failure-free run (goal 0), processes leaked after shutdown (every pid
seen, matched by start time; goal 0), and per fault the largest token gap of any stream in its
window (until the next fault): median / p90 / max, by kind. Table on stdout, JSON at --out
(and .txt beside it), a PNG with --png (matplotlib).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.bench.experiments import experiment_header, write_results  # noqa: E402
from tarragon.launcher import pid_alive  # noqa: E402
from tarragon.make_model import make_model  # noqa: E402
from tarragon.vocabulary import EventKind, WorkerState  # noqa: E402

ROLES = ("attention", "expert", "store", "orchestrator")
ACTIONS = ("kill", "hang", "pause")  # SIGKILL; SIGSTOP left stopped; SIGSTOP then SIGCONT


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@dataclass
class Fault:
    t: float
    action: str
    victims: list[str]
    roles: list[str]
    pids: list[int]
    cont_after_s: float | None = None  # pause: SIGCONT this long after the SIGSTOP
    healed_after_s: float | None = None  # until the cluster had healed again (None: not within the timeout)
    stall_s: float = 0.0  # the largest token gap of any stream in this fault's window
    events: list = field(default_factory=list)  # the orchestrator's events in its window: (s after the fault, kind, worker, detail)


@dataclass
class Done:
    prompt: int
    submitted: float
    tokens: list[int]
    times: list[float]
    finish_reason: str | None
    error: str | None = None


@dataclass
class Soak:
    """The stream load: `streams` requests in flight at all times, each checked when it ends."""

    llm: LLM
    prompts: list[list[int]]
    params: SamplingParams
    streams: int
    request_timeout_s: float
    done: list[Done] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # every pid of the cluster seen -> its start time
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        inflight, next_prompt, last_scan = [], 0, 0.0
        while not self.stop.is_set() or inflight:
            for i, req in list(inflight):
                late = time.monotonic() - req.submitted > self.request_timeout_s
                if req.done.is_set() or late:
                    if late and not req.done.is_set():
                        self.llm.abort(req)
                        req.error = req.error or f"not ended after {self.request_timeout_s:.0f} s"
                        req.finish_reason = "hung"
                    n = self.llm.advance(req)
                    self.done.append(Done(i, req.submitted, req.tokens[:n], req.times[:n], req.finish_reason, req.error))
                    inflight.remove((i, req))
            while not self.stop.is_set() and len(inflight) < self.streams:
                inflight.append((next_prompt % len(self.prompts), self.llm.submit(self.prompts[next_prompt % len(self.prompts)], self.params)))
                next_prompt += 1
            if time.monotonic() - last_scan > 0.25:
                self.scan()
                last_scan = time.monotonic()
            time.sleep(0.01)

    def scan(self) -> None:
        for w in self.llm.workers():
            if w.pid > 0 and w.pid not in self.seen and (st := start_time(w.pid)) is not None:
                self.seen[w.pid] = st


def live(llm: LLM, role: str) -> list:
    return [w for w in llm.workers() if w.role == role and w.state == WorkerState.READY and w.alive and proc_state(w.pid) not in "TtZX"]


def healed(llm: LLM, shape: dict[str, int]) -> bool:
    return all(len(live(llm, r)) >= n for r, n in shape.items()) and llm.health()[0]


class Deck:
    """Draws without replacement, reshuffled when empty: every kind and every action comes up
    evenly, also in a short run."""

    def __init__(self, items, rng: random.Random):
        self.items, self.rng, self.left = list(items), rng, []

    def draw(self):
        if not self.left:
            self.left = self.rng.sample(self.items, len(self.items))
        return self.left.pop()


def inject(llm: LLM, rng: random.Random, double: float, roles: Deck, actions: Deck) -> Fault | None:
    """One fault (two processes with probability `double`) on random live processes."""
    action = actions.draw()
    picks = []
    for _ in range(2 if rng.random() < double else 1):
        candidates = [w for w in live(llm, roles.draw()) if w.name not in {p.name for p in picks}]
        if candidates:
            picks.append(rng.choice(candidates))
    if not picks:
        return None
    f = Fault(time.monotonic(), action, [w.name for w in picks], [w.role for w in picks], [w.pid for w in picks])
    starts = [start_time(w.pid) for w in picks]
    for w in picks:
        llm.kill(w.name, signal.SIGKILL if action == "kill" else signal.SIGSTOP)
    if action == "pause":
        f.cont_after_s = round(rng.uniform(0.05, 2.0), 3)

        def cont() -> None:
            for pid, st in zip(f.pids, starts):
                if start_time(pid) == st:  # the same process, if it has not been fenced meanwhile
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
        threading.Timer(f.cont_after_s, cont).start()
    return f


def window_events(llm: LLM, last: list[Fault]) -> None:
    """The events since the last fault, kept with it (a successor orchestrator's log starts empty,
    so they are read before the next fault)."""
    if last:
        try:
            last[0].events = [(round(e.t - last[0].t, 3), e.kind, e.worker, e.detail) for e in llm.events(2.0) if e.t >= last[0].t]
        except TimeoutError:
            last[0].events = [(0.0, "events_unavailable", "", "the orchestrator did not answer")]


def stalls(faults: list[Fault], done: list[Done], end: float) -> None:
    """Per fault: the largest gap between two tokens of one stream whose later token falls in the
    fault's window (from the fault to the next one)."""
    gaps = [(b, b - a) for d in done for a, b in zip(d.times, d.times[1:])]
    for f, nxt in zip(faults, [g.t for g in faults[1:]] + [end]):
        f.stall_s = max((g for b, g in gaps if f.t < b <= nxt), default=0.0)


def leaked(seen: dict[int, int], wait_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        alive = [pid for pid, st in seen.items() if pid_alive(pid) and start_time(pid) == st]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    return {"n": len(s), "median_ms": round(1000 * statistics.median(s), 1), "p90_ms": round(1000 * s[min(len(s) - 1, int(0.9 * len(s)))], 1),
            "max_ms": round(1000 * s[-1], 1)}


def run(args) -> dict:
    rng = random.Random(args.seed)
    model = args.model or str(make_model(Path(tempfile.mkdtemp(prefix="chaos-model-")), "mixtral", "tiny", seed=1))
    record = experiment_header("chaos: random SIGKILL / SIGSTOP of every kind of process under a stream load", model,
                               f"{args.streams} greedy streams x {args.max_tokens} tokens always in flight; 2 AW x 2 EW, shadows=1; "
                               f"{args.faults} faults every ~{args.interval:g} s once healed; double faults p={args.double:g}")
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, 500, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (16,), generator=g)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm = LLM(model, attention_workers=2, expert_workers=2, shadows=1, max_model_len=512, stall_timeout_s=args.request_timeout)
    shape = {"attention": 2, "expert": 2, "store": max(1, llm.config.resilience.stores), "orchestrator": 1}
    faults: list[Fault] = []
    try:
        t0 = time.monotonic()
        reference = [o.token_ids for o in llm.generate(prompts, params, timeout=120)]
        quiet = Soak(llm, prompts, params, args.streams, args.request_timeout)
        threading.Thread(target=quiet.run, daemon=True).start()  # a failure-free window, for scale
        time.sleep(args.interval)
        quiet.stop.set()
        soak = Soak(llm, prompts, params, args.streams, args.request_timeout, seen=quiet.seen)
        loader = threading.Thread(target=soak.run, daemon=True)
        loader.start()
        roles, actions = Deck(ROLES, rng), Deck(ACTIONS, rng)
        while len(faults) < args.faults:
            time.sleep(rng.uniform(0.5, 1.5) * args.interval)
            window_events(llm, faults[-1:])
            f = inject(llm, rng, args.double, roles, actions)
            if f is None:
                continue
            faults.append(f)
            print(f"[{f.t - t0:7.1f} s] fault {len(faults)}: {f.action} {', '.join(f.victims)}", flush=True)
            heal_deadline = time.monotonic() + args.heal_timeout
            time.sleep(0.3)
            while not healed(llm, shape) and time.monotonic() < heal_deadline:
                time.sleep(0.1)
            if healed(llm, shape):
                f.healed_after_s = round(time.monotonic() - f.t, 2)
            else:
                print(f"  not healed after {args.heal_timeout:.0f} s: {[(w.name, w.state, w.alive) for w in llm.workers()]}", flush=True)
        time.sleep(args.interval)
        window_events(llm, faults[-1:])
        soak.stop.set()
        loader.join(args.request_timeout + 30)
        end = time.monotonic()
        soak.scan()
    finally:
        llm.shutdown()
    stalls(faults, soak.done, end)
    return summarize(record, faults, soak, quiet, reference, leaked(soak.seen), llm)


def summarize(record: dict, faults: list[Fault], soak: Soak, quiet: Soak, reference: list[list[int]], leaked_pids: list[int], llm: LLM) -> dict:
    failed = [d for d in soak.done if d.finish_reason not in ("length", "stop")]
    differing = [d for d in soak.done if d.finish_reason in ("length", "stop") and d.tokens != reference[d.prompt]]
    quiet_gaps = [b - a for d in quiet.done for a, b in zip(d.times, d.times[1:])]
    by_kind = {f"{a}:{r}": quantiles([f.stall_s for f in faults if f.action == a and r in f.roles]) for a in ACTIONS for r in ROLES}
    record |= {
        "faults": len(faults), "double_faults": sum(len(f.victims) > 1 for f in faults),
        "requests": len(soak.done), "requests_failed": len(failed), "outputs_differing": len(differing),
        "processes_seen": len(soak.seen), "processes_leaked": len(leaked_pids), "leaked_pids": leaked_pids,
        "not_healed": sum(f.healed_after_s is None for f in faults),
        # workers failed in a fault's window that were not its victims (nor replaced victims' successors
        # failing with them): false alarms, or failures caused by the fault
        "other_failures": [(i + 1, e) for i, f in enumerate(faults) for e in f.events if e[1] == EventKind.WORKER_FAILED and e[2] not in f.victims],
        "stall": quantiles([f.stall_s for f in faults]), "stall_by_kind": {k: v for k, v in by_kind.items() if v["n"]},
        "quiet_largest_gap_ms": round(1000 * max(quiet_gaps, default=0.0), 1),
        "orchestrator_restarts": llm.orchestrator_restarts, "failures_detected": dict(llm.failures),
        "failed_examples": [asdict(d) | {"times": None} for d in failed[:10]],
        "fault_log": [asdict(f) for f in faults],
    }
    rows = [("faults (double)", f"{len(faults)} ({record['double_faults']})"), ("requests", len(soak.done)),
            ("requests failed (goal 0)", len(failed)), ("outputs differing (goal 0)", len(differing)),
            ("processes leaked (goal 0)", f"{len(leaked_pids)} of {len(soak.seen)}"), ("faults not healed", record["not_healed"]),
            ("largest gap, failure-free", f"{record['quiet_largest_gap_ms']} ms"),
            ("other workers failed (not victims)", len(record["other_failures"]))]
    s = record["stall"]
    rows.append(("stall per fault median / p90 / max", f"{s.get('median_ms')} / {s.get('p90_ms')} / {s.get('max_ms')} ms"))
    rows += [(f"  {k} (n={v['n']})", f"{v['median_ms']} / {v['p90_ms']} / {v['max_ms']} ms") for k, v in record["stall_by_kind"].items()]
    record["table"] = "\n".join(f"{k:<40} {v}" for k, v in rows)
    return record


def plot(record: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = {"attention": "tab:blue", "expert": "tab:orange", "store": "tab:green", "orchestrator": "tab:red"}
    markers = {"kill": "x", "hang": "s", "pause": "o"}
    for i, f in enumerate(record["fault_log"]):
        ax.scatter(i + 1, 1000 * f["stall_s"], c=colors[f["roles"][0]], marker=markers[f["action"]], s=40 if len(f["roles"]) == 1 else 90)
    ax.set_yscale("log")
    ax.set_xlabel("fault")
    ax.set_ylabel("largest token gap in its window (ms)")
    ax.set_title("chaos soak: color = kind (blue AW, orange EW, green store, red orchestrator); x kill, square hang, o pause")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between faults (jittered x0.5-1.5), counted once healed")
    ap.add_argument("--double", type=float, default=0.15, help="probability that a fault hits two processes at once")
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--heal-timeout", type=float, default=60.0)
    ap.add_argument("--request-timeout", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="checkpoint (default: a tiny random Mixtral built in a temp folder)")
    ap.add_argument("--out", default="docs/results/chaos.json")
    ap.add_argument("--png", action="store_true", help="also a PNG of the stall per fault beside --out")
    args = ap.parse_args()
    record = run(args)
    write_results(record, record["table"], args.out)
    if args.png and plot(record, Path(args.out).with_suffix(".png")):
        print(f"wrote {Path(args.out).with_suffix('.png')}")
    ok = record["requests_failed"] == 0 and record["outputs_differing"] == 0 and record["processes_leaked"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

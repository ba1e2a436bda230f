"""Resuming a request after its attention worker dies, by failure position: restoring the KV
from the checkpoint store vs re-prefilling prompt + output vs replaying token by token.

    .venv/bin/python bench/restore.py [--model DIR] [--positions 64 256 1024] [--runs 3] [--short]
                                      [--stores 2] [--store-first] [--policies tarragon ...]

One request whose context holds --positions tokens has its attention worker SIGKILLed after 8
generated tokens; the figure is its largest token gap across the failure. The recovery policy is
a cluster setting, so one cluster per policy (2 AW x 1 EW), all up at once, runs interleaved.
This drives `LLM` in-process (the failure lands at an exact token, which a timed HTTP fault
cannot promise). Medians of --runs; ratios from the same runs. Writes
docs/results/restore.json and restore.png. --store-first SIGKILLs a checkpoint store just before
the attention worker (with two stores the other one serves the restore).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.bench.experiments import experiment_header, write_results  # noqa: E402
from tarragon.faults import stall_s  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402
from tarragon.vocabulary import EventKind, Role, WorkerState  # noqa: E402

POLICIES = {"tarragon": "restore from checkpoint", "recompute": "re-prefill", "replay": "token-by-token replay"}


def resume_gap(llm: LLM, context: int, seed: int, store_first: bool = False) -> float:
    """Kill the worker of one request 8 tokens in; the stall (`faults.stall_s`): its largest token
    gap across the failure, or starting within a second after it."""
    wait_attention(llm, 2)  # the previous run's replacement (and the store's)
    rng = random.Random(seed)
    prompt = [rng.randrange(3, llm.model_config.vocab_size) for _ in range(context)]
    req = llm.submit(prompt, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))  # (room to be killed mid-stream)
    while len(req.tokens) < 8:
        time.sleep(0.0005)
    if store_first:
        llm.kill(next(w.name for w in llm.workers() if w.role == Role.STORE and w.state == WorkerState.READY))
    killed_at = time.monotonic()
    llm.kill(req.worker)
    return stall_s([llm.wait(req, 600).token_times], killed_at)


def wait_attention(llm: LLM, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(w.role == Role.ATTENTION and w.state == WorkerState.READY for w in llm.workers()) < n or any(w.state == WorkerState.STARTING for w in llm.workers()) \
            or sum(w.role == Role.STORE and w.state == WorkerState.READY for w in llm.workers()) < llm.config.resilience.stores:
        if time.monotonic() > deadline:
            raise TimeoutError("the attention worker was not replaced")
        time.sleep(0.05)


def plot(table: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, label in POLICIES.items():
        xs = sorted(table, key=int)
        ax.plot([int(x) for x in xs], [table[x][policy] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context at failure (tokens)")
    ax.set_ylabel("token gap across the failure (ms, median)")
    ax.set_title("Resuming one request after its attention worker dies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--positions", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--short", action="store_true", help="one short position, one run (the test suite's form)")
    ap.add_argument("--stores", type=int, default=2, help="checkpoint stores")
    ap.add_argument("--store-first", action="store_true", help="SIGKILL a store just before the attention worker")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="a table and plot need all three")
    ap.add_argument("--out", default="docs/results/restore.json")
    args = ap.parse_args()
    if args.short:
        args.positions, args.runs = [32], 1
    model = args.model or str(demo_model())
    record = experiment_header("resuming one request after its attention worker dies, by failure position", model,
                               f"one request, context {', '.join(map(str, args.positions))} tokens, killed 8 tokens in; "
                               f"2 AW x 1 EW x {args.stores} store(s) per policy" + (", a store killed first" if args.store_first else "")
                               + f"; median of {args.runs}")
    gaps: dict[int, dict[str, list[float]]] = {c: {p: [] for p in args.policies} for c in args.positions}
    llms: dict[str, LLM] = {}
    try:
        for p in args.policies:
            llms[p] = LLM(model, attention_workers=2, expert_workers=1, recovery=p, max_model_len=max(args.positions) + 64, stores=args.stores)
        for run in range(args.runs):
            for ctx in args.positions:
                for p, llm in llms.items():
                    gaps[ctx][p].append(1000 * resume_gap(llm, ctx, seed=run, store_first=args.store_first))
                print(f"run {run + 1}, context {ctx}: " + ", ".join(f"{p} {gaps[ctx][p][-1]:.0f} ms" for p in args.policies), flush=True)
            if run == 0:
                print("restores: " + "; ".join(e.detail for e in llms[args.policies[0]].events() if e.kind == EventKind.RESTORED), flush=True)
    finally:
        for llm in llms.values():
            llm.shutdown()
    med = statistics.median
    if set(args.policies) != set(POLICIES):
        print({ctx: {p: f"{med(v):.0f} ms" for p, v in g.items()} for ctx, g in gaps.items()})
        return
    table = {ctx: {p: med(v) for p, v in g.items()} for ctx, g in gaps.items()}
    ratios = {ctx: {f"{p}/tarragon": med(a / b for a, b in zip(g[p], g["tarragon"])) for p in ("recompute", "replay")}
              for ctx, g in gaps.items()}
    lines = [f"{'context':>8} | {'restore ms':>10} | {'re-prefill ms':>13} | {'replay ms':>10} | {'re-prefill/restore':>18} | {'replay/restore':>14}"]
    for ctx in args.positions:
        t, r = table[ctx], ratios[ctx]
        lines.append(f"{ctx:>8} | {t['tarragon']:>10.0f} | {t['recompute']:>13.0f} | {t['replay']:>10.0f} | "
                     f"{r['recompute/tarragon']:>17.1f}x | {r['replay/tarragon']:>13.1f}x")
    record.update(median_gap_ms=table, ratios=ratios, runs_ms=gaps)
    write_results(record, "\n".join(lines), args.out)
    plot(table, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()

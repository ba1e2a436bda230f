"""Failover under load: an expert worker and an attention worker SIGKILLed while Poisson traffic
streams, under each recovery policy (`tarragon`, `recompute`, `restart`).

    .venv/bin/python bench/failover.py [--model DIR] [--runs 3] [--short]

One server per policy (2 AW x 3 EW, shadows=1), all up at once; each run sends the same load to
each in turn (policies interleaved), one fault per run at --fault-at seconds, then waits for the
cluster to heal. Stall = the largest token gap, as the client saw it, among the streams in flight
at the fault (tarragon.faults.stall_s, via tarragon.bench.report.fault_report); beside it, the largest gap of the same streams before
the fault, for scale. Medians of --runs; the ratios restart/tarragon and
recompute/tarragon are taken within each run, then their median. Writes docs/results/failover.json and one timeline PNG per
fault (the first run of each policy side by side).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon.bench.experiments import Load, bench_load, experiment_header, write_results  # noqa: E402
from tarragon.bench.plot import plot_timelines  # noqa: E402
from tarragon.bench.report import summarize  # noqa: E402
from tarragon.bench.server import Server, start_servers  # noqa: E402
from tarragon.faults import Fault  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402

POLICIES = ("tarragon", "recompute", "restart")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--output-len", type=int, default=512, help="long enough that requests are streaming at the fault (at 128, now and then none was)")
    ap.add_argument("--fault-at", type=float, default=3.0, help="seconds into each run")
    ap.add_argument("--faults", nargs="+", default=["expert", "attention"], help="roles to kill (hang:expert for SIGSTOP)")
    ap.add_argument("--expert-workers", type=int, default=3)
    ap.add_argument("--short", action="store_true", help="one small run, an attention worker's failure only, 2 AW x 1 EW (the test suite's form)")
    ap.add_argument("--out", default="docs/results/failover.json")
    args = ap.parse_args()
    if args.short:
        args.runs, args.rate, args.num_prompts, args.output_len, args.fault_at = 1, 8.0, 8, 200, 1.0  # all in flight at 1 s
        args.faults, args.expert_workers = ["attention"], 1
    model = args.model or str(demo_model())
    load = Load(f"{args.rate:g} req/s", args.rate, args.num_prompts, output_len=args.output_len)
    record = experiment_header("failover: SIGKILL of one worker under load, by recovery policy", model,
                               f"Poisson {args.rate:g} req/s, {args.num_prompts} requests x 10 tokens in / {args.output_len} out; "
                               f"2 AW x {args.expert_workers} EW, shadows=1; fault at {args.fault_at:g} s; median of {args.runs}")
    faults = {role: Fault.parse(f"{role}:0@{args.fault_at}s") for role in args.faults}
    cells, first_runs = run_faults(model, args, load, faults)
    table, lines = tabulate(cells)
    record.update(table=table, runs=cells)
    write_results(record, "\n".join(lines), args.out)
    for name, panels in first_runs.items():
        png = Path(args.out).with_name(f"{Path(args.out).stem}_{name.replace(':', '_')}.png")
        if plot_timelines(panels, png, f"{name} worker {'SIGSTOP' if name.startswith('hang') else 'SIGKILL'} at {args.fault_at:g} s, {load.name}"):
            print(f"wrote {png}")


def run_faults(model: str, args: argparse.Namespace, load: Load, faults: dict[str, Fault]) -> tuple[dict, dict]:
    """Each run, each fault, each policy's server in turn: one cell of figures per (fault, policy,
    run); the first run of each fault kept whole for its timeline."""
    cells: dict[str, dict[str, list[dict]]] = {f: {p: [] for p in POLICIES} for f in faults}
    first_runs: dict[str, list] = {f: [] for f in faults}
    servers: dict[str, Server] = start_servers({p: ["--model", model, "--recovery", p, "--expert-workers", str(args.expert_workers)]
                                                for p in POLICIES})
    try:
        for run in range(args.runs):
            for name, fault in faults.items():
                for p, srv in servers.items():
                    br = bench_load(srv, load, [fault], seed=run)
                    s = summarize(br)
                    f = s["faults"][0]
                    cells[name][p].append({"stall_ms": f.get("stall_ms"), "gap_before_ms": f.get("largest_gap_before_ms"),
                                           "detect_ms": f.get("detect_ms"),
                                           "tokens_recomputed": f.get("tokens_recomputed"), "streams": f.get("streams_in_flight"),
                                           "failed_requests": s["failed_requests"], "itl_p50_ms": s["itl_ms"]["median"],
                                           "error": f["error"], "steps": f.get("steps", [])})
                    print(f"run {run + 1} {name} {p}: stall {f.get('stall_ms', float('nan')):.0f} ms, "
                          f"failed {s['failed_requests']}", flush=True)
                    if run == 0:
                        first_runs[name].append((p, br))
    finally:
        for srv in servers.values():
            srv.stop()
    return cells, first_runs


def tabulate(cells: dict[str, dict[str, list[dict]]]) -> tuple[dict, list[str]]:
    """Per fault and policy: the medians over runs, and the median of the per-run ratio to tarragon."""
    med = statistics.median
    table: dict[str, dict] = {}
    lines = [f"{'fault':>10} | {'policy':>9} | {'stall ms':>9} | {'x tarragon':>10} | {'gap before ms':>13} | {'detect ms':>9} | "
             f"{'tokens recomputed':>17} | failed"]
    nan = float("nan")
    for name, by_policy in cells.items():
        for p, cs in by_policy.items():
            # A run with no stream in flight at the fault (all still waiting for their first
            # token, or done) measured no stall: it is left out, not counted as 0 ms.
            measured = [c for c in cs if c["streams"]]
            stall = med(c["stall_ms"] for c in measured) if measured else nan
            pairs = [(c, t) for c, t in zip(cs, by_policy["tarragon"]) if c["streams"] and t["streams"] and t["stall_ms"]]
            ratio = med(c["stall_ms"] / t["stall_ms"] for c, t in pairs) if pairs else nan  # within each run
            detect = [c["detect_ms"] for c in cs if c["detect_ms"] is not None]
            row = {"stall_ms": stall, "ratio_to_tarragon": ratio, "gap_before_ms": med(c["gap_before_ms"] for c in measured) if measured else nan,
                   "runs_measured": len(measured),
                   "detect_ms": med(detect) if detect else None,
                   "tokens_recomputed": med(c["tokens_recomputed"] or 0 for c in cs), "failed_requests": sum(c["failed_requests"] for c in cs)}
            table.setdefault(name, {})[p] = row
            lines.append(f"{name:>10} | {p:>9} | {stall:>9.0f} | {ratio:>9.1f}x | {row['gap_before_ms']:>13.0f} | "
                         f"{row['detect_ms'] if row['detect_ms'] is not None else float('nan'):>9.1f} | {row['tokens_recomputed']:>17.0f} | {row['failed_requests']}")
    return table, lines


if __name__ == "__main__":
    main()

"""What the bench/ scripts share: a named load, running it against a `Server` once its cluster has
healed, failure-free A/B comparisons of server variants, and results files that state the
machine, the model and the load.

Here rather than in each script so that every experiment measures and records the same way.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..faults import Fault
from .client import BenchRun, run_load
from .report import machine, summarize, write_json
from .server import Server, start_servers
from .workload import random_requests


@dataclass
class Load:
    """One arrival pattern of random requests (the paper's: 10 tokens in, 128 out)."""

    name: str
    rate: float
    num_prompts: int
    input_len: int = 10
    output_len: int = 128
    max_concurrency: int | None = None


def bench_load(server: Server, load: Load, faults: list[Fault] = (), seed: int = 0) -> BenchRun:
    """Run one load against `server` (any faults on schedule), once its cluster has healed from
    the previous run's faults (waiting before, not after: nobody waits after the last run)."""
    server.heal()
    reqs = random_requests(load.num_prompts, load.input_len, load.output_len, server.info["vocab_size"], seed)
    run = asyncio.run(run_load(server.url, reqs, load.rate, max_concurrency=load.max_concurrency, faults=faults,
                               api_key=server.api_key, seed=seed, progress=False))
    return run


def headline(s: dict[str, Any]) -> dict[str, float]:
    """The figures the experiments compare."""
    return {"output_tok_s": s["output_throughput"], "ttft_p50_ms": s["ttft_ms"]["median"], "itl_p50_ms": s["itl_ms"]["median"],
            "itl_p99_ms": s["itl_ms"]["p99"], "tpot_p50_ms": s["tpot_ms"]["median"], "failed": s["failed_requests"]}


def compare_variants(variants: dict[str, list[str]], loads: list[Load], runs: int) -> dict[str, Any]:
    """Failure-free A/B: one server per variant (`tarragon serve` arguments), all up at once; each
    load runs `runs` times with the variants interleaved, so the machine's noise hits all alike.
    Per load: each variant's headline figures per run and their medians, and the median of the
    per-run ratios of the first variant to each other one ("on/off")."""
    servers = start_servers(variants)
    try:
        for srv in servers.values():
            bench_load(srv, Load("warm-up", math.inf, 4, 10, 8))  # first requests pay for lazy initialisation
        out: dict[str, Any] = {}
        for load in loads:
            per = {name: [] for name in variants}
            for run in range(runs):
                for name, srv in servers.items():
                    per[name].append(headline(summarize(bench_load(srv, load, seed=run))))
                print(f"{load.name} run {run + 1}: " + "; ".join(
                    f"{n} {v[-1]['output_tok_s']:.0f} tok/s, ITL p50 {v[-1]['itl_p50_ms']:.1f} ms" for n, v in per.items()), flush=True)
            base = next(iter(variants))
            out[load.name] = {"load": asdict(load), "runs": per,
                              "median": {n: {k: statistics.median(r[k] for r in v) for k in v[0]} for n, v in per.items()},
                              "ratio_median": {f"{base}/{n}": {k: statistics.median(b[k] / a[k] for a, b in zip(v, per[base]) if a[k])
                                                               for k in v[0] if k != "failed"} for n, v in per.items() if n != base}}
        return out
    finally:
        for srv in servers.values():
            srv.stop()


def format_comparison(out: dict[str, Any]) -> str:
    """compare_variants' result as a table: medians per variant, then the median per-run ratio."""
    keys = ("output_tok_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")
    lines = [f"{'load':>14} | {'variant':>18} | " + " | ".join(f"{k:>12}" for k in keys)]
    for name, r in out.items():
        for variant, m in r["median"].items():
            lines.append(f"{name:>14} | {variant:>18} | " + " | ".join(f"{m[k]:>12.1f}" for k in keys))
        for label, ratio in r["ratio_median"].items():
            lines.append(f"{name:>14} | {label:>18} | " + " | ".join(f"{ratio[k]:>12.3f}" for k in keys))
    return "\n".join(lines)


def layout_argv(layout: str) -> list[str]:
    """"2x3" -> the `tarragon serve` arguments for 2 attention and 3 expert workers."""
    aws, ews = layout.split("x")
    return ["--attention-workers", aws, "--expert-workers", ews]


def layout_text(layout: str) -> str:
    aws, ews = layout.split("x")
    return f"{aws} AW x {ews} EW"


def write_results(record: dict[str, Any], table: str, out: str | Path) -> None:
    """An experiment's results: the JSON, and beside it (.txt) what it states and its table."""
    print(table)
    write_json(record, out)
    header = "\n".join(f"{k}: {record[k]}" for k in ("experiment", "date", "machine", "model", "load"))
    Path(out).with_suffix(".txt").write_text(f"{header}\n\n{table}\n")
    print(f"wrote {out} and {Path(out).with_suffix('.txt')}")


def median_us(fn, repeats: int, flush=None, warm: int = 3) -> float:
    """The median wall time of `fn()` in microseconds over `repeats` calls, after `warm` untimed
    ones; `flush` (a large tensor), where given, is read before each call: the caches cold, as in
    a running cluster where the other workers' weights evict them."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.sum()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def experiment_header(what: str, model: str, load: str) -> dict[str, Any]:
    """What every results file states: the machine, the model and the load."""
    m = machine()
    print(f"{what}\nmachine: {m['cpus']} CPUs ({m['processor']}), torch {m['torch']}, GPU: {m['cuda'] or 'none'}\n"
          f"model: {model}\nload: {load}", flush=True)
    return {"experiment": what, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": m, "model": model, "load": load}


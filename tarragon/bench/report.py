"""The report of a run: `vllm bench serve`'s figures (throughput; mean / median / p99 of TTFT,
TPOT, ITL, E2EL), then per fault what the cluster did about it (from the server's event log) and
the stall the clients saw (`faults.stall_s`); as text, as vLLM's result JSON, or as ours.

Apart from the client so that a saved run can be summarised again, and the figures checked, with
no server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..faults import largest_gap_s, stall_s
from ..vocabulary import EventKind
from .client import BenchRun, RequestResult


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def _stats_ms(xs: list[float], percentiles: tuple[float, ...] = (99,)) -> dict[str, float]:
    ms = [1000 * x for x in xs]
    out = {"mean": statistics.fmean(ms) if ms else float("nan"), "median": percentile(ms, 50), "p99": percentile(ms, 99),
           "std": statistics.pstdev(ms) if ms else float("nan")}
    return out | {f"p{p:g}": percentile(ms, p) for p in percentiles}


METRICS = ("ttft", "tpot", "itl", "e2el")  # --percentile-metrics / --goodput names, as vLLM's


def request_metrics(r: RequestResult) -> dict[str, float | None]:
    """One request's TTFT, TPOT and E2EL in seconds (None where undefined)."""
    ttft = r.chunk_times[0] - r.start if r.chunk_times else None
    tpot = (r.end - r.chunk_times[0]) / (r.output_len - 1) if r.chunk_times and r.output_len > 1 else None
    return {"ttft": ttft, "tpot": tpot, "e2el": r.end - r.start}


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """`ttft:500 tpot:50` -> SLOs in seconds (given in ms, as vllm bench serve takes them)."""
    slos = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"bad --goodput {spec!r}: expected ttft|tpot|e2el:MILLISECONDS")
        try:
            slos[name] = float(value) / 1000
        except ValueError:
            raise ValueError(f"bad --goodput {spec!r}: {value!r} is not a number of milliseconds") from None
    return slos


def itl_samples(reqs: list[RequestResult]) -> list[float]:
    return [b - a for r in reqs for a, b in zip(r.chunk_times, r.chunk_times[1:])]


def summarize(run: BenchRun, percentiles: tuple[float, ...] = (99,), goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """`vllm bench serve`'s figures, plus one record per fault."""
    ok = [r for r in run.requests if r.ok]
    duration = run.end - run.start
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    per = [request_metrics(r) for r in ok]
    ttft = [m["ttft"] for m in per if m["ttft"] is not None]
    tpot = [m["tpot"] for m in per if m["tpot"] is not None]
    good = sum(all(m[k] is not None and m[k] <= v for k, v in goodput.items()) for m in per) if goodput else None
    return {
        "successful_requests": len(ok),
        "failed_requests": len(run.requests) - len(ok),
        "errors": sorted({r.error for r in run.requests if r.error})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "request_goodput": good / duration if good is not None and duration else None,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats_ms(ttft, percentiles),
        "tpot_ms": _stats_ms(tpot, percentiles),
        "itl_ms": _stats_ms(itl_samples(ok), percentiles),
        "e2el_ms": _stats_ms([m["e2el"] for m in per], percentiles),
        "faults": [fault_report(run, i) for i in range(len(run.faults))],
    }




def fault_report(run: BenchRun, i: int) -> dict[str, Any]:
    """What one fault cost: detection, the recovery steps until the next fault, the largest token
    gap of the streams in flight at it (as the client saw it), and the tokens computed again."""
    rec = run.faults[i]
    out: dict[str, Any] = {"fault": str(rec.fault), "victim": rec.victim, "at_s": rec.client_t - run.start, "error": rec.error}
    if rec.error:
        return out
    tf = rec.client_t
    # Streams that had started streaming (a request still in its prefill shows up in TTFT).
    streams = [r.chunk_times for r in run.requests if r.chunk_times and r.chunk_times[0] < tf < r.end]
    out.update(streams_in_flight=len(streams), stall_ms=1000 * stall_s(streams, tf),
               largest_gap_before_ms=1000 * largest_gap_s(streams, before=tf))
    if run.server is None:
        return out
    # The server's own clock from here on: events between this fault and the next one.
    t_end = min((f.server_t for f in run.faults[i + 1:] if f.server_t > rec.server_t), default=math.inf)
    # The driver's own "stall" report is left out: the stall is the one above, as the clients saw it.
    events = [e for e in run.server["events"] if rec.server_t <= e["t"] < t_end and e["kind"] != EventKind.STALL]
    steps = [{"after_ms": 1000 * (e["t"] - rec.server_t), **{k: e[k] for k in ("kind", "worker", "detail", "ms")}} for e in events]
    detected = next((s for s in steps if s["kind"] == EventKind.WORKER_FAILED and s["worker"] == rec.victim), None)
    # a restore's uncommitted tail, as its new worker reported it
    tail = sum(e["request_tokens"] - e["restored_tokens"] for e in events if e["kind"] == EventKind.RESTORED)
    recomputed = sum(x["tokens"] for x in run.server.get("recomputed", []) if rec.server_t <= x["t"] < t_end)
    out.update(detect_ms=detected["after_ms"] if detected else None, detection=detected["detail"] if detected else "not detected",
               tokens_recomputed=tail + recomputed, steps=steps)
    return out


def _step_lines(steps: list[dict]) -> list[str]:
    """Recovery steps, one line per kind (a restore is one event per request)."""
    kinds: dict[str, list[dict]] = {}
    for s in steps:
        kinds.setdefault(s["kind"], []).append(s)
    lines = []
    for kind, ss in kinds.items():
        when = f"{ss[0]['after_ms']:.0f} ms" if len(ss) == 1 else f"{ss[0]['after_ms']:.0f}-{ss[-1]['after_ms']:.0f} ms"
        took = f", took {statistics.median(s['ms'] for s in ss):.0f} ms{' (median)' if len(ss) > 1 else ''}" if any(s["ms"] for s in ss) else ""
        lines.append(f"    +{when:<16} {kind}{f' x{len(ss)}' if len(ss) > 1 else ''}: {ss[0]['worker']} {ss[0]['detail'][:70]}{took}")
    return lines


def format_report(s: dict[str, Any], title: str = "Serving Benchmark Result", metrics: tuple[str, ...] = ("ttft", "tpot", "itl"),
                  percentiles: tuple[float, ...] = (99,)) -> str:
    """The summary as `vllm bench serve` prints it, then the faults."""
    rows = [("Successful requests:", s["successful_requests"]), ("Failed requests:", s["failed_requests"]),
            ("Benchmark duration (s):", f"{s['duration_s']:.2f}"), ("Total input tokens:", s["total_input_tokens"]),
            ("Total generated tokens:", s["total_output_tokens"]), ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    if s.get("request_goodput") is not None:
        rows.insert(6, ("Request goodput (req/s):", f"{s['request_goodput']:.2f}"))
    lines = [f"{' ' + title + ' ':=^60}", *(f"{k:<40}{v:<20}" for k, v in rows)]
    names = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)", "itl": "Inter-token Latency",
             "e2el": "End-to-end Latency"}
    for metric in metrics:
        lines.append(f"{names[metric]:-^60}")
        stats = [("mean", "Mean"), ("median", "Median")] + [(f"p{p:g}", f"P{p:g}") for p in percentiles]
        for stat, label in stats:
            lines.append(f"{f'{label} {metric.upper()} (ms):':<40}{s[f'{metric}_ms'][stat]:<20.2f}")
    for e in s["errors"]:
        lines.append(f"error: {e}")
    for f in s["faults"]:
        lines.append(f"{' Fault ' + f['fault'] + ' ':-^60}")
        if f["error"]:
            lines.append(f"not injected: {f['error']}")
            continue
        lines.append(f"{'Victim:':<40}{f['victim']} at {f['at_s']:.2f} s")
        if "detect_ms" in f:
            lines.append(f"{'Time to detect (ms):':<40}{f['detect_ms']:.1f}" if f["detect_ms"] is not None else "Not detected")
        lines.append(f"{'Stall (ms):':<40}{f['stall_ms']:.1f}  ({f['streams_in_flight']} streams; largest gap before: "
                     f"{f['largest_gap_before_ms']:.0f} ms)")
        if "tokens_recomputed" in f:
            lines.append(f"{'Tokens recomputed:':<40}{f['tokens_recomputed']}")
            lines.append("Recovery steps (after the fault):")
            lines += _step_lines(f["steps"])
    lines.append("=" * 60)
    return "\n".join(lines)



def write_json(obj: Any, path: str | Path) -> None:
    """JSON with inf/nan written as null (strict JSON has neither)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(obj), indent=1, default=str))


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def vllm_result(run: BenchRun, s: dict[str, Any], args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """`vllm bench serve --save-result`'s JSON (its keys and units), plus our fault records and,
    with --save-detailed, every request's chunk times."""
    rate = args.request_rate
    ok = [r for r in run.requests if r.ok]
    out: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "label": args.label, "model_id": info["id"],
        "tokenizer_id": args.tokenizer or info["id"], "num_prompts": len(run.requests),
        "request_rate": rate if math.isfinite(rate) else "inf", "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "duration": s["duration_s"], "completed": s["successful_requests"], "failed": s["failed_requests"],
        "total_input_tokens": s["total_input_tokens"], "total_output_tokens": s["total_output_tokens"],
        "request_throughput": s["request_throughput"], "request_goodput": s["request_goodput"],
        "output_throughput": s["output_throughput"], "total_token_throughput": s["total_token_throughput"],
        **dict(kv.split("=", 1) for kv in args.metadata or []),
    }
    for metric in args.percentile_metrics:
        st = s[f"{metric}_ms"]
        out |= {f"mean_{metric}_ms": st["mean"], f"median_{metric}_ms": st["median"], f"std_{metric}_ms": st["std"]}
        out |= {f"p{p:g}_{metric}_ms": st[f"p{p:g}"] for p in args.metric_percentiles}
    if args.save_detailed:
        out |= {"input_lens": [r.prompt_len for r in ok], "output_lens": [r.output_len for r in ok],
                "ttfts": [r.chunk_times[0] - r.start if r.chunk_times else 0.0 for r in ok],
                "itls": [[b - a for a, b in zip(r.chunk_times, r.chunk_times[1:])] for r in ok],
                "generated_texts": [r.text for r in ok], "errors": [r.error for r in run.requests if r.error]}
    out["faults"] = s["faults"]  # ours: what each fault cost (stall, detection, recovery steps)
    return out




def run_json(run: BenchRun, detail: bool = False) -> dict[str, Any]:
    """The summary, and with `detail` every request's chunk times (relative to the start)."""
    out = {"summary": summarize(run)}
    if detail:
        out["requests"] = [{**asdict(r), "start": r.start - run.start, "end": r.end - run.start,
                            "chunk_times": [t - run.start for t in r.chunk_times]} for r in run.requests]
    return out


"""`tarragon bench`: load an OpenAI-compatible server with streaming requests, inject worker
faults on a schedule, and report what the clients saw.

The report follows `vllm bench serve` (throughput; mean / median / p99 of TTFT, TPOT, ITL, E2EL)
and adds, per fault, what the cluster did about it (from the server's event log) and the stall
the clients saw. Everything is timed on the client; server times are only compared with each
other (event minus fault), so the server may be on another host. Fault injection needs a server
started with `--enable-fault-injection`; `tarragon bench` without `--base-url` starts one itself.

The experiment scripts under bench/ are built from the functions here: `Server`,
`make_requests`, `run_load`, `summarize`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .vocabulary import EventKind

BUILTIN_DATASET = Path(__file__).parent / "data" / "conversations.json"
BIN_S = 0.25  # timeline bin width
SETTLE_S = 1.0  # a token gap that starts this soon after a fault counts towards its stall


# ---- inputs -------------------------------------------------------------------------------------


@dataclass
class Fault:
    """`expert:1@20s`: SIGKILL the expert worker at index 1 (of those live then) 20 s into the
    run; `hang:attention:0@5s` sends SIGSTOP instead."""

    role: str
    index: int
    at_s: float
    action: str = "kill"

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        m = re.fullmatch(r"(?:(kill|hang):)?(expert|attention):(\d+)@(\d+(?:\.\d*)?)(s|ms)?", spec.strip())
        if not m:
            raise ValueError(f"bad --fault {spec!r}: expected [kill:|hang:]expert|attention:INDEX@SECONDS, e.g. expert:1@20s")
        action, role, index, at, unit = m.groups()
        return cls(role, int(index), float(at) / (1000 if unit == "ms" else 1), action or "kill")

    def __str__(self) -> str:
        return f"{'hang:' if self.action == 'hang' else ''}{self.role}:{self.index}@{self.at_s:g}s"


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (the random dataset)
    prompt_len: int
    output_len: int


def random_requests(n: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0, range_ratio: float = 0.0) -> list[BenchRequest]:
    """Token-id prompts (ids from 3 up, clear of the usual special tokens); lengths drawn
    uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)], as `vllm bench serve`."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    out = []
    for _ in range(n):
        i, o = length(input_len), length(output_len)
        out.append(BenchRequest([rng.randrange(3, vocab_size) for _ in range(i)], i, o))
    return out


def sharegpt_requests(path: str | Path, n: int, tokenizer, max_model_len: int, output_len: int | None = None,
                      seed: int = 0) -> list[BenchRequest]:
    """The first human turn of each conversation as the prompt; the reply's length in tokens as
    the output length (or `output_len`). Conversations too long for the context are skipped."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the dataset {path}: {e}") from None
    pairs = []
    for conv in data if isinstance(data, list) else []:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"{path}: no conversations in ShareGPT format ([{{'conversations': [{{'from', 'value'}}, ...]}}, ...])")
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        plen = len(tokenizer.encode(prompt))
        olen = output_len or max(4, len(tokenizer.encode(reply, add_special_tokens=False)))
        if plen and plen + olen <= max_model_len:
            out.append(BenchRequest(prompt, plen, olen))
    if not out:
        raise ValueError(f"{path}: every conversation is longer than the context ({max_model_len} tokens)")
    return [out[i % len(out)] for i in range(n)]  # repeat the set if asked for more


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """When each request is sent, in seconds from the start: gamma-distributed gaps with mean
    1/rate (burstiness 1 is Poisson; lower is burstier, higher more regular); rate inf: all at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    start: float  # client time.monotonic() when sent
    prompt_len: int
    output_len: int  # tokens received (the server's usage count)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with text
    end: float = 0.0
    error: str = ""
    text: str = ""


@dataclass
class FaultRecord:
    fault: Fault
    client_t: float  # client time.monotonic(), midway through the POST
    server_t: float = 0.0  # the server's time.monotonic() at the signal
    victim: str = ""
    error: str = ""


@dataclass
class BenchRun:
    start: float
    end: float
    requests: list[RequestResult]
    faults: list[FaultRecord]
    server: dict | None = None  # GET /tarragon/events after the run


def request_body(model: str, req: BenchRequest, chat: bool) -> dict[str, Any]:
    """What `vllm bench serve` sends (openai / openai-chat backends), greedy and ignoring EOS so
    that every request's length is exactly the one asked for."""
    common = {"model": model, "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        return {**common, "messages": [{"role": "user", "content": [{"type": "text", "text": req.prompt}]}],
                "max_completion_tokens": req.output_len}
    return {**common, "prompt": req.prompt, "max_tokens": req.output_len, "repetition_penalty": 1.0, "logprobs": None}


async def _stream_one(client, url: str, headers: dict, model: str, req: BenchRequest, chat: bool = False) -> RequestResult:
    """One streamed request; fewer tokens than asked for (or an error) counts as a failure."""
    body = request_body(model, req, chat)
    res = RequestResult(False, time.monotonic(), req.prompt_len, 0)
    finish = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.prompt_len = chunk["usage"]["prompt_tokens"]
                    res.output_len = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:
                        res.chunk_times.append(now)
                        res.text += piece
                    finish = choice.get("finish_reason") or finish
    except Exception as e:  # a dropped connection is a failed request, not a crashed benchmark
        res.error = f"{type(e).__name__}: {e}"
        return res
    finally:
        res.end = time.monotonic()
    if finish is None:
        res.error = "the stream ended without a finish reason"
    elif res.output_len != req.output_len:
        res.error = f"{res.output_len} tokens instead of {req.output_len}"
    res.ok = not res.error
    return res


async def _inject(client, base_url: str, headers: dict, fault: Fault, t0: float) -> FaultRecord:
    """Fire one fault on time. The server says when (its clock) and whom; the midpoint of the
    POST is the client's estimate of the moment."""
    await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
    sent = time.monotonic()
    rec = FaultRecord(fault, sent)
    try:
        r = await client.post(f"{base_url}/tarragon/fault", json={"role": fault.role, "index": fault.index, "action": fault.action},
                              headers=headers)
        rec.client_t = (sent + time.monotonic()) / 2
        if r.status_code == 200:
            rec.server_t, rec.victim = r.json()["t"], r.json()["victim"]
        else:
            rec.error = f"HTTP {r.status_code}: {r.text[:200]}"
    except Exception as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def run_load(base_url: str, requests: list[BenchRequest], rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, faults: list[Fault] = (), duration: float | None = None,
                   api_key: str | None = None, seed: int = 0, progress: bool = True, endpoint: str = "/v1/completions",
                   model: str | None = None) -> BenchRun:
    """Send `requests` at the given arrival rate (stopping new sends after `duration` seconds, if
    given), fire `faults` on schedule, and collect every stream's chunk arrival times."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
        model = model or (await client.get(f"{base_url}/v1/models", headers=headers)).json()["data"][0]["id"]
        chat = "chat" in endpoint
        gate = asyncio.Semaphore(max_concurrency or len(requests) or 1)
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)

        async def one(req: BenchRequest, at: float) -> RequestResult | None:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if duration is not None and time.monotonic() - t0 > duration:
                return None
            async with gate:
                res = await _stream_one(client, f"{base_url}{endpoint}", headers, model, req, chat)
            bar.update(1)
            return res

        t0 = time.monotonic()
        fault_tasks = [asyncio.create_task(_inject(client, base_url, headers, f, t0)) for f in faults]
        offsets = arrival_offsets(len(requests), rate, burstiness, seed)
        results = [r for r in await asyncio.gather(*(one(q, at) for q, at in zip(requests, offsets))) if r is not None]
        end = max((r.end for r in results), default=time.monotonic())
        records = list(await asyncio.gather(*fault_tasks))
        bar.close()
        server = None
        if faults:
            r = await client.get(f"{base_url}/tarragon/events", headers=headers)
            server = r.json() if r.status_code == 200 else None
    return BenchRun(t0, end, results, records, server)


# ---- the report ---------------------------------------------------------------------------------


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


def stall_s(streams: list[list[float]], t_fault: float) -> float:
    """THE stall of a fault, the one figure every report gives: the largest gap between
    consecutive tokens of any stream across the fault (a gap ending after it and starting before
    it or within SETTLE_S of it). `streams` are token (or chunk) arrival times on the clock of
    `t_fault`; a stream that had not started streaming shows the fault in its TTFT instead."""
    return max((b - a for times in streams if times and times[0] < t_fault
                for a, b in zip(times, times[1:]) if b > t_fault and a < t_fault + SETTLE_S), default=0.0)


def largest_gap_before_s(streams: list[list[float]], t_fault: float) -> float:
    """The same streams' largest token gap before the fault: what the stall compares with."""
    return max((b - a for times in streams for a, b in zip(times, times[1:]) if b <= t_fault), default=0.0)


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
               largest_gap_before_ms=1000 * largest_gap_before_s(streams, tf))
    if run.server is None:
        return out
    # The server's own clock from here on: events between this fault and the next one.
    t_end = min((f.server_t for f in run.faults[i + 1:] if f.server_t > rec.server_t), default=math.inf)
    # The driver's own "stall" report is left out: the stall is the one above, as the clients saw it.
    events = [e for e in run.server["events"] if rec.server_t <= e["t"] < t_end and e["kind"] != "stall"]
    steps = [{"after_ms": 1000 * (e["t"] - rec.server_t), **{k: e[k] for k in ("kind", "worker", "detail", "ms")}} for e in events]
    detected = next((s for s in steps if s["kind"] == "worker_failed" and s["worker"] == rec.victim), None)
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


def timeline(run: BenchRun) -> dict[str, Any]:
    """Output tokens/s in BIN_S bins and each inter-chunk gap at its arrival, from the run's start
    (a chunk carries output_len / chunks tokens: almost always one); per fault, its time, label,
    stall and replacement window; the failure-free rate (median of the bins before the first fault)."""
    end = run.end - run.start
    bins = [0.0] * (int(end / BIN_S) + 1)
    itl_t, itl = [], []
    for r in run.requests:
        if not r.chunk_times:
            continue
        per_chunk = r.output_len / len(r.chunk_times) if r.ok else 1.0
        for j, t in enumerate(r.chunk_times):
            bins[min(int((t - run.start) / BIN_S), len(bins) - 1)] += per_chunk / BIN_S
            if j:
                itl_t.append(t - run.start)
                itl.append(1000 * (t - r.chunk_times[j - 1]))
    faults = []
    for f in run.faults:
        if f.error:
            continue
        streams = [r.chunk_times for r in run.requests if r.chunk_times and r.chunk_times[0] < f.client_t < r.end]
        ready = [e["t"] for e in (run.server or {}).get("events", [])
                 if e["kind"] == "replacement_ready" and e["t"] > f.server_t and e["detail"].endswith(f" {f.victim}")]
        faults.append({"t": f.client_t - run.start, "label": f"{'SIGSTOP' if f.fault.action == 'hang' else 'SIGKILL'} {f.victim}",
                       "stall_ms": 1000 * stall_s(streams, f.client_t),
                       "replaced_t": f.client_t - run.start + (min(ready) - f.server_t) if ready else None})
    first = min((f["t"] for f in faults), default=end)
    before = [v for t, v in zip([BIN_S * i for i in range(len(bins))], bins) if t + BIN_S <= first and v > 0]
    return {"t": [BIN_S * i for i in range(len(bins))], "tokens_per_s": bins, "itl_t": itl_t, "itl_ms": itl, "faults": faults,
            "baseline": statistics.median(before) if before and faults else None}


def plot_timelines(panels: list[tuple[str, BenchRun]], path: str | Path, title: str = "") -> bool:
    """One column per run: output tokens/s (top) and inter-token latency (bottom) over time, both
    from 0; each fault a red line with its stall written beside it, its replacement window shaded,
    the failure-free rate dashed. False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'tarragon[bench]'): no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels) + 1, 5.5), sharex="col", sharey="row", squeeze=False)
    for col, (name, run) in enumerate(panels):
        tl = timeline(run)
        top, bottom = axes[0][col], axes[1][col]
        top.step(tl["t"], tl["tokens_per_s"], where="post", lw=1, label="output tokens/s")
        if tl["baseline"]:
            top.axhline(tl["baseline"], color="grey", ls=":", lw=1, label=f"failure-free: {tl['baseline']:.0f} tokens/s")
        bottom.scatter(tl["itl_t"], tl["itl_ms"], s=2, alpha=0.5)
        for i, f in enumerate(tl["faults"]):
            for ax in (top, bottom):
                ax.axvline(f["t"], color="red", ls="--", lw=1)
                ax.axvspan(f["t"], f["replaced_t"] or tl["t"][-1] + BIN_S, color="orange", alpha=0.15, lw=0,
                           label="until the replacement is ready" if ax is top and i == 0 else None)
            top.annotate(f["label"], (f["t"], 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                         fontsize=7, color="red")
            bottom.annotate(f"stall {f['stall_ms']:.0f} ms", (f["t"], f["stall_ms"]), xytext=(4, 0), textcoords="offset points",
                            fontsize=7, color="red", va="center")
        top.set_ylim(bottom=0)
        bottom.set_ylim(bottom=0)
        top.set_title(name, fontsize=10)
        top.legend(fontsize=7, loc="lower left")
        bottom.set_xlabel("time since the start (s)")
    axes[0][0].set_ylabel(f"output tokens/s ({int(1000 * BIN_S)} ms bins)")
    axes[1][0].set_ylabel("gap between tokens (ms)")
    fig.suptitle(title or "Output tokens/s and token gaps while workers fail", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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


def result_path(args: argparse.Namespace, info: dict[str, Any]) -> Path:
    """--result-file, else --result-dir / (--result-filename or vLLM's default name)."""
    if args.result_file:
        return Path(args.result_file)
    rate = f"{args.request_rate:g}" if math.isfinite(args.request_rate) else "inf"
    name = args.result_filename or (f"{args.backend}-{rate}qps{f'-concurrency{args.max_concurrency}' if args.max_concurrency else ''}"
                                    f"-{info['id'].split('/')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return Path(args.result_dir or ".") / name


def run_json(run: BenchRun, detail: bool = False) -> dict[str, Any]:
    """The summary, and with `detail` every request's chunk times (relative to the start)."""
    out = {"summary": summarize(run)}
    if detail:
        out["requests"] = [{**asdict(r), "start": r.start - run.start, "end": r.end - run.start,
                            "chunk_times": [t - run.start for t in r.chunk_times]} for r in run.requests]
    return out


# ---- a server of our own ------------------------------------------------------------------------


class Server:
    """`tarragon serve ARGS --enable-fault-injection` on a free local port, in its own process
    group, stopped (with its whole cluster) on exit."""

    def __init__(self, args: list[str], api_key: str | None = None, wait: bool = True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tarragon-bench-server-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "tarragon", "serve", *args, "--host", "127.0.0.1", "--port", str(port), "--enable-fault-injection"]
        if api_key:
            cmd += ["--api-key", api_key]
        from .worker import die_with_parent

        me = os.getpid()  # if this process dies, so does the server (and with it its cluster)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     preexec_fn=lambda: die_with_parent(me))
        if wait:
            try:
                self.wait_started()
            except BaseException:
                self.stop()
                raise

    def wait_started(self, timeout: float = 300.0) -> None:
        self.roles = wait_healthy(self.url, timeout=timeout, proc=self.proc, log=self.log.name)
        self.info = server_info(self.url, self.api_key)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # uvicorn exits, `tarragon serve` shuts the cluster down
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the workers die with their parents (parent-death signal)
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)

    def heal(self, timeout: float = 180.0) -> None:
        """Wait until the cluster is back to its size at start (after a fault's replacement)."""
        wait_healthy(self.url, self.roles, timeout, self.proc, self.log.name)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_servers(argvs: dict[str, list[str]]) -> dict[str, Server]:
    """Several servers started side by side (their start-ups overlap), each ready on return."""
    servers: dict[str, Server] = {}
    try:
        for name, argv in argvs.items():
            servers[name] = Server(argv, wait=False)
        for srv in servers.values():
            srv.wait_started()
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


def wait_healthy(base_url: str, roles: dict[str, int] | None = None, timeout: float = 180.0, proc=None, log: str = "") -> dict[str, int]:
    """Poll until /health says ok, no worker is starting and (if given) as many workers per role
    are ready as `roles` says; returns the ready workers per role."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log else ""
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{tail}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                workers = httpx.get(f"{base_url}/v1/cluster", timeout=10).json()["workers"]
                ready: dict[str, int] = {}
                for w in workers:
                    ready[w["role"]] = ready.get(w["role"], 0) + (w["state"] == "ready")
                if not any(w["state"] == "starting" for w in workers) and (roles is None or all(ready.get(k, 0) >= n for k, n in roles.items())):
                    return ready
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} not healthy after {timeout:.0f} s")
        time.sleep(0.2)


def server_info(base_url: str, api_key: str | None = None) -> dict[str, Any]:
    """/v1/models' entry and /v1/cluster (vocabulary size, recovery policy), where there is one."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    info = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    r = httpx.get(f"{base_url}/v1/cluster", headers=headers, timeout=30)
    if r.status_code == 200:
        info.update({k: v for k, v in r.json().items() if k in ("vocab_size", "recovery", "shadows")})
    return info


def make_requests(args: argparse.Namespace, info: dict[str, Any], n: int, url: str = "") -> list[BenchRequest]:
    """The dataset that --dataset-name / --dataset-path / --random-* ask for; for chat, random
    token ids become text through the server's /detokenize (as vLLM decodes them)."""
    if args.dataset_name == "random":
        vocab = info.get("vocab_size") or _tokenizer(args).vocab_size
        reqs = random_requests(n, args.random_input_len, args.random_output_len, vocab, args.seed, args.random_range_ratio)
        if "chat" in getattr(args, "endpoint", ""):
            import httpx

            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            for r in reqs:
                r.prompt = httpx.post(f"{url}/detokenize", json={"tokens": r.prompt}, headers=headers, timeout=30).json()["prompt"]
        return reqs
    path = BUILTIN_DATASET if args.dataset_name == "builtin" else args.dataset_path
    if not path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path FILE")
    return sharegpt_requests(path, n, _tokenizer(args), info.get("max_model_len", 2048), args.sharegpt_output_len, args.seed)


def _tokenizer(args: argparse.Namespace):
    """The model's tokenizer, to measure prompts and replies (the demo model's by default)."""
    from .make_model import demo_model
    from .tokenizer import Tokenizer

    return Tokenizer(args.tokenizer or args.model or demo_model())


# ---- experiments (the bench/ scripts) ----------------------------------------------------------


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


def experiment_header(what: str, model: str, load: str) -> dict[str, Any]:
    """What every results file states: the machine, the model and the load."""
    m = machine()
    print(f"{what}\nmachine: {m['cpus']} CPUs ({m['processor']}), torch {m['torch']}, GPU: {m['cuda'] or 'none'}\n"
          f"model: {model}\nload: {load}", flush=True)
    return {"experiment": what, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": m, "model": model, "load": load}


# ---- the command --------------------------------------------------------------------------------


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """`vllm bench serve`'s flags (those that apply here), plus --fault, --duration and --plot."""
    p.add_argument("--backend", default="openai", choices=["openai", "openai-chat", "vllm"],
                   help="openai/vllm: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--endpoint", default=None, help="the API path (default: the backend's)")
    p.add_argument("--base-url", default=None, help="a running server (default: --host/--port if given, else start one with the "
                                                    "cluster arguments above)")
    p.add_argument("--host", default=None, help="a running server's host (with --port; default: start a server)")
    p.add_argument("--port", type=int, default=None, help="a running server's port (default host: 127.0.0.1)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY if set)")
    p.add_argument("--served-model-name", default=None, help="the model name sent (default: the server's /v1/models entry)")
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "builtin"],
                   help="random token ids of fixed lengths; a ShareGPT JSON file (--dataset-path); a small built-in conversation set")
    p.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file for --dataset-name sharegpt")
    p.add_argument("--tokenizer", default=None, help="checkpoint folder whose tokenizer measures text prompts (default: --model)")
    p.add_argument("--random-input-len", type=int, default=10, help="prompt tokens (random dataset)")
    p.add_argument("--random-output-len", type=int, default=128, help="tokens to generate per request (random dataset)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)] (random dataset)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override each reply's length")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    p.add_argument("--duration", type=float, default=None, help="stop sending new requests after this many seconds")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 is Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--ignore-eos", action="store_true", help="accepted for vllm bench serve's sake: requests always ignore EOS here, "
                                                             "so each has exactly the length asked for")
    p.add_argument("--fault", action="append", default=[], metavar="[hang:]ROLE:INDEX@TIME",
                   help="e.g. expert:1@20s, attention:0@40s, hang:expert:2@30s (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrival times")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="comma-separated metrics to report percentiles of "
                                                                          "(ttft, tpot, itl, e2el)")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles to report, e.g. 25,50,99")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for request goodput, e.g. ttft:500 tpot:50 (milliseconds; keys ttft, tpot, e2el)")
    p.add_argument("--save-result", action="store_true", help="write vllm bench serve's result JSON (plus our fault records)")
    p.add_argument("--save-detailed", action="store_true", help="with --save-result: add per-request lengths, TTFTs, ITLs, texts")
    p.add_argument("--result-dir", default=None, help="folder of the result JSON (default: the current one)")
    p.add_argument("--result-filename", default=None, help="name of the result JSON (default: BACKEND-RATEqps-MODEL-DATE.json)")
    p.add_argument("--result-file", default=None, help="write the result JSON to this path (implies --save-result --save-detailed)")
    p.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE", help="extra fields for the result JSON")
    p.add_argument("--label", default=None, help="a label for the result JSON")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--plot", default=None, help="write a PNG timeline: output tokens/s and inter-token latency, faults marked")


def check_bench_args(args: argparse.Namespace) -> list[Fault]:
    """Parse and check what argparse cannot; ValueError names the flag at fault."""
    faults = sorted((Fault.parse(f) for f in args.fault), key=lambda f: f.at_s)
    if args.request_rate <= 0 or args.burstiness <= 0 or args.num_prompts < 1 or (args.max_concurrency or 1) < 1:
        raise ValueError("--request-rate, --burstiness, --num-prompts and --max-concurrency must be positive")
    args.percentile_metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    if bad := [m for m in args.percentile_metrics if m not in METRICS]:
        raise ValueError(f"--percentile-metrics: unknown {', '.join(bad)} (known: {', '.join(METRICS)})")
    try:
        args.metric_percentiles = tuple(float(p) for p in args.metric_percentiles.split(","))
    except ValueError:
        raise ValueError(f"--metric-percentiles: {args.metric_percentiles!r} is not a list of numbers") from None
    if not all(0 < p < 100 for p in args.metric_percentiles):
        raise ValueError("--metric-percentiles must lie in (0, 100)")
    args.goodput_slos = parse_goodput(args.goodput or [])
    args.endpoint = args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")
    if args.metadata and any("=" not in kv for kv in args.metadata):
        raise ValueError("--metadata takes KEY=VALUE pairs")
    if args.result_file:
        args.save_result = args.save_detailed = True
    return faults


def cluster_argv(args: argparse.Namespace) -> list[str]:
    """The `tarragon serve` arguments that reproduce the cluster arguments given to bench."""
    from .cli import add_cluster_args

    p = argparse.ArgumentParser(add_help=False)
    add_cluster_args(p)
    argv = []
    for a in p._actions:
        value = getattr(args, a.dest)
        if value == a.default:
            continue
        flag = a.option_strings[0]
        if isinstance(value, bool):
            argv.append(flag)
        elif isinstance(value, list):  # a repeatable option, e.g. --node
            argv += [x for v in value for x in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


def cmd_bench(args: argparse.Namespace) -> int:
    import httpx

    try:
        faults = check_bench_args(args)
    except ValueError as e:
        print(f"tarragon bench: error: {e}", file=sys.stderr)
        return 2
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    target = args.base_url or (f"http://{args.host or '127.0.0.1'}:{args.port or 8000}" if args.host or args.port else None)
    server = None
    try:
        server = None if target else Server(cluster_argv(args), api_key=args.api_key)
        url = target.rstrip("/") if target else server.url
        info = server_info(url, args.api_key)
        if args.served_model_name:
            info["id"] = args.served_model_name
        timed = args.duration is not None and not math.isinf(args.request_rate)
        n = math.ceil(args.request_rate * args.duration) if timed else args.num_prompts  # --duration: as many as fit
        reqs = make_requests(args, info, n, url)
        run = asyncio.run(run_load(url, reqs, args.request_rate, args.burstiness, args.max_concurrency, faults, args.duration,
                                   args.api_key, args.seed, not args.disable_tqdm, args.endpoint, info["id"]))
    except (httpx.HTTPError, OSError) as e:
        print(f"tarragon bench: error: cannot reach the server at {target or 'the one started'}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, ValueError) as e:  # the server we started did not come up; a bad dataset
        print(f"tarragon bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()
    summary = summarize(run, args.metric_percentiles, args.goodput_slos or None)
    print(format_report(summary, metrics=args.percentile_metrics, percentiles=args.metric_percentiles))
    if args.save_result:
        path = result_path(args, info)
        write_json({**vllm_result(run, summary, args, info), "machine": machine(), "server": info, "summary": summary,
                    **({"requests": run_json(run, detail=True)["requests"]} if args.save_detailed else {})}, path)
        print(f"wrote {path}")
    if args.plot and plot_timelines([(f"{info['id']} (recovery: {info.get('recovery', 'unknown')})", run)], args.plot):
        print(f"wrote {args.plot}")
    return 0 if summary["successful_requests"] else 1

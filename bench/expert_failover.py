"""Expert-worker failover: the token-stream stall of an EW failure, and what resilience costs.

    .venv/bin/python bench/expert_failover.py [--model DIR] [--runs 5]

Stall = the largest gap between consecutive tokens of any request in the failure run, minus the
same figure for a failure-free run of the same load on the same cluster. Each kill hits a
different EW; the next run starts once the replacement has joined. Overhead: failure-free
throughput with detection and shadows on vs off (shadows=0, probing effectively disabled),
clusters alternated A B A B. Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402


def max_gap(outs) -> float:
    return max(max(b - a for a, b in zip(o.token_times, o.token_times[1:])) for o in outs)


def load(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (8 + 4 * i,), generator=g).tolist() for i in range(n)]


def wait_ready(llm: LLM, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while any(w.state == "starting" for w in llm.workers()) or sum(w.role == "expert" and w.state == "ready" for w in llm.workers()) < llm.config.expert_workers:
        if time.monotonic() > deadline:
            raise TimeoutError("replacement did not join")
        time.sleep(0.05)
    time.sleep(0.5)


def stalls(args, model: str) -> dict:
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    results: dict[str, list[float]] = {}
    with LLM(model, attention_workers=2, expert_workers=3, shadows=1) as llm:
        prompts = load(args.requests, llm.model_config.vocab_size)
        base = llm.generate(prompts, params)
        base_gap = max_gap(base)
        for mode, sig, after in (("SIGKILL mid-decode", signal.SIGKILL, args.tokens // 4), ("SIGKILL mid-prefill", signal.SIGKILL, 0),
                                 ("SIGSTOP mid-decode", signal.SIGSTOP, args.tokens // 4)):
            results[mode] = []
            for run in range(args.runs):
                victim = sorted(w.name for w in llm.workers() if w.role == "expert" and w.state == "ready")[run % 3]
                reqs = [llm.submit(p, params) for p in prompts]
                while min(len(r.tokens) for r in reqs) < after:
                    time.sleep(0.001)
                llm.kill(victim, sig)
                outs = [llm.wait(r, 300) for r in reqs]
                assert [o.token_ids for o in outs] == [o.token_ids for o in base], "output differs from the failure-free run"
                results[mode].append(max_gap(outs) - base_gap)
                print(f"{mode} #{run + 1}: killed {victim}, stall {1000 * results[mode][-1]:.1f} ms", flush=True)
                wait_ready(llm)
        events = [e for e in llm.events() if e.kind == "worker_failed"]
    return {"stall_s": results, "baseline_max_gap_s": base_gap, "detect_ms": [e.ms for e in events]}


def overhead(args, model: str) -> dict:
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    variants = {"on": dict(shadows=1), "off": dict(shadows=0, probe_interval_s=3600.0, replace_failed=False)}
    tput: dict[str, list[float]] = {k: [] for k in variants}
    llms = {k: LLM(model, attention_workers=2, expert_workers=3, **kw) for k, kw in variants.items()}
    try:
        prompts = load(32, llms["on"].model_config.vocab_size)
        for k in variants:
            llms[k].generate(prompts[:4], params)
        for _ in range(args.runs):
            for k, llm in llms.items():
                t0 = time.monotonic()
                outs = llm.generate(prompts, params)
                tput[k].append(sum(len(o.token_ids) for o in outs) / (time.monotonic() - t0))
    finally:
        for llm in llms.values():
            llm.shutdown()
    ratios = [a / b for a, b in zip(tput["on"], tput["off"])]
    return {"tokens_per_s": tput, "ratio_on_off": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--out", default="docs/results/expert_failover.json")
    args = ap.parse_args()
    model = args.model or str(demo_model())
    s = stalls(args, model)
    o = overhead(args, model)
    print(f"\nEW failure, 2 AW x 3 EW, shadows=1, {args.requests} requests x {args.tokens} tokens, {os.cpu_count()} CPUs")
    print(f"{'fault':>22} | {'median stall ms':>15} | {'runs (ms)':>40}")
    for mode, v in s["stall_s"].items():
        print(f"{mode:>22} | {1000 * statistics.median(v):>15.1f} | {', '.join(f'{1000 * x:.0f}' for x in v):>40}")
    print(f"detection latency (ms, as reported by the AW that noticed): {', '.join(f'{x:.1f}' for x in s['detect_ms'])}")
    print(f"failure-free throughput, resilience on/off: median ratio {statistics.median(o['ratio_on_off']):.3f} "
          f"(on {statistics.median(o['tokens_per_s']['on']):.0f} tok/s, off {statistics.median(o['tokens_per_s']['off']):.0f} tok/s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": model, "cpus": os.cpu_count(), "stalls": s, "overhead": o}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

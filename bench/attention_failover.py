"""Attention-worker failover: recovery policies side by side, the cost of checkpointing, and
restore time against failure position.

    .venv/bin/python bench/attention_failover.py [--model DIR] [--runs 3] [--parts policies checkpoint restore]

- policies: SIGKILL of the attention worker holding requests, mid-decode, under `tarragon`,
  `recompute` and `restart`; stall of the affected requests = their largest token gap minus the
  failure-free run's; the unaffected requests' largest gap beside it.
- checkpoint: failure-free throughput and median inter-token latency, checkpointing on vs off,
  two clusters alternated A B A B.
- restore: one request with 64, 256 and 1024 tokens of context loses its worker; the gap until its
  next token under restore (`tarragon`), re-prefill (`recompute`) and token-by-token replay.
Medians of --runs; prints tables, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def prompts(n: int, vocab: int, length: int | None = None, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length or 8 + 4 * i,), generator=g).tolist() for i in range(n)]


def healthy(llm: LLM, attention: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(w.role == "attention" and w.state == "ready" for w in llm.workers()) < attention or any(
        w.state == "starting" for w in llm.workers()
    ):
        if time.monotonic() > deadline:
            raise TimeoutError("cluster did not heal")
        time.sleep(0.05)
    time.sleep(0.5)


def kill_busy_aw(llm: LLM, reqs) -> set[str]:
    victim = next(r.worker for r in reqs if not r.done.is_set())
    affected = {r.req_id for r in reqs if r.worker == victim}
    llm.kill(victim)
    return affected


def policies(args, model: str) -> dict:
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for policy in ("tarragon", "recompute", "restart"):
        with LLM(model, attention_workers=2, expert_workers=3, recovery=policy) as llm:
            ps = prompts(args.requests, llm.model_config.vocab_size)
            base = llm.generate(ps, params)
            base_gap = max(max(gaps(o.token_times)) for o in base)
            stalls, others = [], []
            for _ in range(args.runs):
                reqs = [llm.submit(p, params) for p in ps]
                while min(len(r.tokens) for r in reqs) < args.tokens // 2:
                    time.sleep(0.001)
                affected = kill_busy_aw(llm, reqs)
                outs = [llm.wait(r, 600) for r in reqs]
                assert [o.token_ids for o in outs] == [o.token_ids for o in base], f"{policy}: output differs"
                stalls.append(max(max(gaps(o.token_times)) for o in outs if o.request_id in affected) - base_gap)
                others.append(max((max(gaps(o.token_times)) for o in outs if o.request_id not in affected), default=0.0))
                print(f"{policy}: stall {1000 * stalls[-1]:.1f} ms, unaffected max gap {1000 * others[-1]:.1f} ms", flush=True)
                healthy(llm, 2)
        out[policy] = {"stall_s": stalls, "unaffected_max_gap_s": others, "baseline_max_gap_s": base_gap}
    return out


def checkpoint_cost(args, model: str) -> dict:
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    llms = {k: LLM(model, attention_workers=2, expert_workers=2, checkpoint=k == "on") for k in ("on", "off")}
    res = {k: {"tokens_per_s": [], "itl_median_s": []} for k in llms}
    try:
        ps = prompts(32, llms["on"].model_config.vocab_size)
        for llm in llms.values():
            llm.generate(ps[:4], params)
        for _ in range(args.runs + 2):
            for k, llm in llms.items():
                t0 = time.monotonic()
                outs = llm.generate(ps, params)
                res[k]["tokens_per_s"].append(sum(len(o.token_ids) for o in outs) / (time.monotonic() - t0))
                res[k]["itl_median_s"].append(statistics.median(g for o in outs for g in gaps(o.token_times)))
        res["store"] = next((w.__dict__ for w in llms["on"].workers() if w.role == "store"), {})
    finally:
        for llm in llms.values():
            llm.shutdown()
    on, off = res["on"], res["off"]
    res["throughput_ratio_on_off"] = [a / b for a, b in zip(on["tokens_per_s"], off["tokens_per_s"])]
    res["itl_ratio_on_off"] = [a / b for a, b in zip(on["itl_median_s"], off["itl_median_s"])]
    return res


def restore_by_position(args, model: str) -> dict:
    out = {}
    for policy in ("tarragon", "recompute", "replay"):
        out[policy] = {}
        with LLM(model, attention_workers=2, expert_workers=1, recovery=policy, max_model_len=2048) as llm:
            for ctx in args.positions:
                params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
                times = []
                for run in range(args.runs):
                    req = llm.submit(prompts(1, llm.model_config.vocab_size, ctx, seed=run)[0], params)
                    while len(req.tokens) < 8:
                        time.sleep(0.0005)
                    llm.kill(req.worker)
                    o = llm.wait(req, 600)
                    times.append(max(gaps(o.token_times[6:])))
                    healthy(llm, 2)
                out[policy][ctx] = times
                print(f"{policy} at {ctx} tokens: {', '.join(f'{1000 * t:.0f}' for t in times)} ms", flush=True)
    return out


def plot(restore: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, label in (("tarragon", "restore from checkpoint"), ("recompute", "re-prefill"), ("replay", "token-by-token replay")):
        xs = sorted(restore[policy], key=int)
        ax.plot([int(x) for x in xs], [1000 * statistics.median(restore[policy][x]) for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context at failure (tokens)")
    ax.set_ylabel("token gap across the failure (ms, median)")
    ax.set_title("Resuming one request after its attention worker dies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--positions", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--parts", nargs="+", default=["policies", "checkpoint", "restore"])
    ap.add_argument("--out", default="docs/results/attention_failover.json")
    args = ap.parse_args()
    model = args.model or str(demo_model())
    res: dict = {"model": model, "cpus": os.cpu_count(), "runs": args.runs}
    med = statistics.median
    if "policies" in args.parts:
        res["policies"] = p = policies(args, model)
        print(f"\nAW SIGKILL mid-decode, 2 AW x 3 EW, {args.requests} requests x {args.tokens} tokens (median of {args.runs})")
        print(f"{'policy':>10} | {'stall ms':>9} | {'vs tarragon':>11} | {'unaffected max gap ms':>21}")
        for k, v in p.items():
            print(f"{k:>10} | {1000 * med(v['stall_s']):>9.1f} | {med(v['stall_s']) / med(p['tarragon']['stall_s']):>10.1f}x"
                  f" | {1000 * med(v['unaffected_max_gap_s']):>21.1f}")
    if "checkpoint" in args.parts:
        res["checkpoint"] = c = checkpoint_cost(args, model)
        print(f"\ncheckpointing on/off, failure-free, 32 x 64 tokens, 2 AW x 2 EW: throughput ratio "
              f"{med(c['throughput_ratio_on_off']):.3f}, median ITL ratio {med(c['itl_ratio_on_off']):.3f}")
    if "restore" in args.parts:
        res["restore"] = r = restore_by_position(args, model)
        print(f"\ntoken gap across an AW failure, one request (ms, median of {args.runs})")
        print(f"{'context':>8} | {'restore':>8} | {'re-prefill':>10} | {'token replay':>12}")
        for ctx in args.positions:
            print(f"{ctx:>8} | {1000 * med(r['tarragon'][ctx]):>8.1f} | {1000 * med(r['recompute'][ctx]):>10.1f} | {1000 * med(r['replay'][ctx]):>12.1f}")
        plot(r, Path(args.out).with_suffix(".png"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

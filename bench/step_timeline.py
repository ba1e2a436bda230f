"""Where a decode step's time goes, across processes: the attention worker's phases, and for each
MoE layer the trip of its rows to the expert workers and back (the messaging share of the step).

    .venv/bin/python bench/step_timeline.py [--model DIR] [--layout 2x2] [--concurrency 1 8 32]
                                            [--max-tokens 64] [--repeats 3] [--short]

Every worker records its phases (`tarragon/timeline.py`, TARRAGON_TIMELINE=DIR) on the machine's
monotonic clock. Per layer, from the attention worker's dispatch to its combined result:
`to EW` is from the dispatch's end to the first expert worker starting to serve it (the request
through ZeroMQ and the expert worker waking), `EW serves` until the last expert worker serving
it is done, `back` from then until the attention worker has the last reply in hand (the reply
through ZeroMQ and the attention worker waking). `messaging` is the share of the step spent in
dispatch, `to EW` and `back`. Medians over the layers and steps of --repeats runs of N requests
(greedy, --max-tokens each, 16-token prompts). Sizes that split the batch into micro-batches
interleave layers, and the per-layer trip is then not measured. Writes
docs/results/step_timeline.json (and .txt).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.bench.experiments import experiment_header, write_results  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402
from tarragon.timeline import ENV  # noqa: E402

AW_PHASES = ("prepare", "attention", "route", "dispatch", "wait_combine", "lm_head_sample", "finish_step")


def read(folder: str, t0: int, t1: int) -> dict[str, list[tuple[str, int, int, int]]]:
    """Each worker's events that started in [t0, t1], by worker name."""
    out = {}
    for f in Path(folder).glob("*.tsv"):
        rows = [line.split("\t") for line in f.read_text().splitlines()]
        out[f.stem] = [(p, int(a), int(b), int(c)) for p, a, b, c in rows if t0 <= int(a) <= t1]
    return out


def layer_trips(aw: list, serves: list) -> dict[str, list[float]]:
    """Per MoE layer (one dispatch, then its wait): the trip's legs in microseconds."""
    results = [e for e in aw if e[0] == "wait_combine"]
    accepts = [e for e in aw if e[0] == "accept"]
    legs: dict[str, list[float]] = defaultdict(list)
    for d in (e for e in aw if e[0] == "dispatch"):
        r = next((e for e in results if e[1] >= d[2]), None)
        if r is None:
            continue
        served = [s for s in serves if d[2] <= s[1] <= r[2]]
        got = [a for a in accepts if d[2] <= a[1] <= r[2]]
        if not served or not got:
            continue
        legs["to EW"].append((min(s[1] for s in served) - d[2]) / 1e3)
        legs["EW serves"].append((max(s[2] for s in served) - min(s[1] for s in served)) / 1e3)
        legs["back"].append((max(a[2] for a in got) - max(s[2] for s in served)) / 1e3)
        legs["dispatch"].append((d[2] - d[1]) / 1e3)
    return legs


def analyse(events: dict[str, list], groups: int) -> dict:
    """`groups`: micro-batches a step runs as (each runs the LM head: one step is that many)."""
    aw_name = max((w for w in events if w.startswith("aw")), key=lambda w: len(events[w]))
    aw = events[aw_name]
    serves = sorted(e for w, evs in events.items() if w.startswith("ew") for e in evs if e[0] == "serve")
    heads = [e[1] for e in aw if e[0] == "lm_head_sample"][::groups]
    steps = max(1, len(heads))
    step_ms = statistics.median(b - a for a, b in zip(heads, heads[1:])) / 1e6 if len(heads) > 1 else 0.0
    per_step = {p: sum(e[2] - e[1] for e in aw if e[0] == p) / steps / 1e6 for p in AW_PHASES}
    waiting_cpu = sum(e[3] for e in aw if e[0] == "wait_combine") / steps / 1e6
    ew_busy = {w: sum(e[2] - e[1] for e in evs if e[0] == "serve") / steps / 1e6 for w, evs in sorted(events.items()) if w.startswith("ew")}
    out = {"attention_worker": aw_name, "steps": steps, "step_ms": step_ms, "aw_ms_per_step": per_step,
           "aw_cpu_ms_in_wait_combine": waiting_cpu, "ew_serving_ms_per_step": ew_busy}
    if groups == 1:
        legs = layer_trips(aw, serves)
        out["layer_us"] = {k: statistics.median(v) for k, v in legs.items()}
        layers = len(legs["dispatch"]) / steps
        messaging = sum(out["layer_us"][k] for k in ("dispatch", "to EW", "back")) * layers / 1e3
        out["messaging_share"] = messaging / step_ms if step_ms else 0.0
    return out


def table(results: dict[int, dict]) -> str:
    lines = ["requests | step ms | attention worker per step, ms: " + " / ".join(AW_PHASES) + " | EW serving ms/step",
             "         |         | per layer, us: dispatch / to EW / EW serves / back | messaging share"]
    for n, r in results.items():
        aw = " / ".join(f"{r['aw_ms_per_step'][p]:.2f}" for p in AW_PHASES)
        ew = " ".join(f"{w} {v:.2f}" for w, v in r["ew_serving_ms_per_step"].items())
        lines.append(f"{n:8d} | {r['step_ms']:7.2f} | {aw} | {ew}")
        if "layer_us" in r:
            legs = " / ".join(f"{r['layer_us'][k]:.0f}" for k in ("dispatch", "to EW", "EW serves", "back"))
            lines.append(f"{'':8s} | {'':7s} | {legs} | {r['messaging_share'] * 100:.0f} %")
        else:
            lines.append(f"{'':8s} | {'':7s} | (split into micro-batches: layers interleave) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--layout", default="2x2", help="attention x expert workers")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short", action="store_true", help="1 and 16 requests, 16 tokens, one run each")
    ap.add_argument("--out", default="docs/results/step_timeline.json")
    args = ap.parse_args()
    if args.short:
        args.concurrency, args.max_tokens, args.repeats = [1, 16], 16, 1
    model = args.model or str(demo_model())
    aws, ews = (int(x) for x in args.layout.split("x"))
    record = experiment_header("where a decode step's time goes (per-process timeline)", model,
                               f"{args.layout}, N requests of 16 random tokens, {args.max_tokens} new each, greedy; {args.repeats} runs")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        os.environ[ENV] = folder  # the workers started below inherit it
        with LLM(model, attention_workers=aws, expert_workers=ews) as llm:
            vocab = llm.model_config.vocab_size
            prompts = lambda n: [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(16)] for i in range(n)]  # noqa: E731
            llm.generate(prompts(2), params)
            for n in args.concurrency:
                t0 = time.monotonic_ns()
                for _ in range(args.repeats):
                    llm.generate(prompts(n), params)
                t1 = time.monotonic_ns()
                time.sleep(1.5)  # every worker writes its events once a second
                sched = llm.config.scheduler
                split = sched.micro_batches > 1 and n >= sched.micro_batches * sched.split_min
                results[n] = analyse(read(folder, t0, t1), groups=sched.micro_batches if split else 1)
        del os.environ[ENV]
    record["results"] = results
    write_results(record, table(results), args.out)


if __name__ == "__main__":
    main()

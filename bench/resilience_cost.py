"""The failure-free cost of resilience: every feature on (shadow experts, 10 ms probes, KV
checkpointing) vs all off, across request rates.

    .venv/bin/python bench/resilience_cost.py [--model DIR] [--rates 1 2 4] [--runs 3] [--short]

Two servers (2 AW x 3 EW by default) up at once; at each Poisson rate the same requests go to each in turn,
--runs times. Reports medians of throughput, TTFT, ITL p50 / p99 and the median of the per-run
ratios on/off (throughput below 1 and latencies above 1 are what resilience costs). Writes
docs/results/resilience_cost.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon.bench.experiments import Load, compare_variants, experiment_header, format_comparison, layout_argv, layout_text, write_results  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="Poisson arrivals, requests/s")
    ap.add_argument("--seconds", type=float, default=10.0, help="of arrivals per run (requests = rate x seconds)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layout", default="2x3", help="attention x expert workers")
    ap.add_argument("--short", action="store_true", help="one small run on 1 AW x 1 EW (the test suite's form)")
    ap.add_argument("--out", default="docs/results/resilience_cost.json")
    args = ap.parse_args()
    if args.short:
        args.rates, args.seconds, args.output_len, args.runs = [8.0], 1.0, 32, 1
        args.layout = "1x1"
    model = args.model or str(demo_model())
    loads = [Load(f"{r:g} req/s", r, max(2, round(r * args.seconds)), output_len=args.output_len) for r in args.rates]
    record = experiment_header("the cost of resilience: all features on vs off, failure-free", model,
                               f"Poisson {', '.join(l.name for l in loads)} for {args.seconds:g} s each, 10 tokens in / "
                               f"{args.output_len} out; {layout_text(args.layout)}; median of {args.runs}")
    common = ["--model", model, *layout_argv(args.layout)]
    variants = {"on": common, "off": [*common, "--shadows", "0", "--no-checkpoint", "--probe-interval-s", "3600"]}
    out = compare_variants(variants, loads, args.runs)
    record.update(variants=variants, results=out)
    write_results(record, format_comparison(out), args.out)


if __name__ == "__main__":
    main()

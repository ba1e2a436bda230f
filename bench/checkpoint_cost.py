"""The cost of asynchronous KV checkpointing, failure-free: checkpointing on vs off, or (with
--stores) every checkpoint written to two stores vs one.

    .venv/bin/python bench/checkpoint_cost.py [--model DIR] [--runs 5] [--short] [--stores]

Two servers (2 AW x 3 EW by default, everything else alike) up at once; the same batch of requests, all sent
at once, goes to each in turn, --runs times. Reports medians of throughput, TTFT and ITL and the
median of the per-run ratios on/off. Writes docs/results/checkpoint_cost.json (checkpoint_stores.json).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon.bench.experiments import Load, compare_variants, experiment_header, format_comparison, layout_argv, layout_text, write_results  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layout", default="2x3", help="attention x expert workers")
    ap.add_argument("--short", action="store_true", help="one small run on 1 AW x 1 EW (the test suite's form)")
    ap.add_argument("--stores", action="store_true", help="compare two checkpoint stores (each written in full) with one")
    ap.add_argument("--out", default=None, help="default: docs/results/checkpoint_cost.json (checkpoint_stores.json with --stores)")
    args = ap.parse_args()
    if args.short:
        args.num_prompts, args.output_len, args.runs = 8, 32, 1
        args.layout = "1x1"
    model = args.model or str(demo_model())
    load = Load(f"{args.num_prompts} at once", math.inf, args.num_prompts, output_len=args.output_len)
    what = "2 stores vs 1" if args.stores else "on vs off"
    record = experiment_header(f"the cost of KV checkpointing: {what}, failure-free", model,
                               f"{args.num_prompts} requests at once, 10 tokens in / {args.output_len} out; {layout_text(args.layout)}; "
                               f"median of {args.runs}")
    common = ["--model", model, *layout_argv(args.layout)]
    if args.stores:
        variants = {"2 stores": [*common, "--stores", "2"], "1 store": [*common, "--stores", "1"]}
    else:
        variants = {"on": common, "off": [*common, "--no-checkpoint"]}
    out = compare_variants(variants, [load], args.runs)
    record.update(variants=variants, results=out)
    default = "docs/results/checkpoint_stores.json" if args.stores else "docs/results/checkpoint_cost.json"
    write_results(record, format_comparison(out), args.out or default)


if __name__ == "__main__":
    main()

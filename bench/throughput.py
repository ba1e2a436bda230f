"""Failure-free offline throughput of the bench model: Tarragon layouts beside transformers.

    .venv/bin/python bench/throughput.py [--model DIR] [--concurrency 1 8 32] [--repeats 3]

Each cell is the median of `--repeats` runs of N concurrent requests x `--max-tokens` tokens
(greedy, EOS ignored), all in this one process on this one machine. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def tarragon_runs(model: str, layout: str, concurrency: list[int], args) -> dict[int, list[float]]:
    aws, ews = (int(x) for x in layout.split("x"))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[int, list[float]] = {}
    with LLM(model, attention_workers=aws, expert_workers=ews, dtype=args.dtype) as llm:
        vocab = llm.model_config.vocab_size
        llm.generate(prompts(2, args.prompt_len, vocab), params)  # warm-up
        for n in concurrency:
            ps = prompts(n, args.prompt_len, vocab)
            out[n] = []
            for _ in range(args.repeats):
                t0 = time.monotonic()
                outs = llm.generate(ps, params)
                out[n].append(sum(len(o.token_ids) for o in outs) / (time.monotonic() - t0))
    return out


def transformers_runs(model: str, concurrency: list[int], args) -> dict[int, list[float]]:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()  # its default, fast paths
    m.generation_config.eos_token_id = None
    out: dict[int, list[float]] = {}
    with torch.inference_mode():
        for n in concurrency:
            ids = torch.tensor(prompts(n, args.prompt_len, m.config.vocab_size))
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False)
            m.generate(ids[:1], **{**kw, "attention_mask": torch.ones_like(ids[:1]), "max_new_tokens": 4, "min_new_tokens": 4})
            out[n] = []
            for _ in range(args.repeats):
                t0 = time.monotonic()
                m.generate(ids, **kw)
                out[n].append(n * args.max_tokens / (time.monotonic() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--layouts", nargs="*", default=["1x1", "2x2"], help="AWxEW")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default="docs/results/throughput.json")
    args = ap.parse_args()
    model = args.model or str(demo_model())

    results: dict[str, dict[int, list[float]]] = {}
    for layout in args.layouts or []:
        results[f"tarragon {layout}"] = tarragon_runs(model, layout, args.concurrency, args)
    if not args.no_transformers:
        results["transformers generate"] = transformers_runs(model, args.concurrency, args)

    cols = list(results)
    print(f"\nthroughput, tokens/s (median of {args.repeats}; {args.max_tokens} new tokens per request, {args.dtype}, {os.cpu_count()} CPUs)")
    print(f"{'concurrent':>10} | " + " | ".join(f"{c:>22}" for c in cols))
    for n in args.concurrency:
        cells = []
        for c in cols:
            med = statistics.median(results[c][n])
            ratio = ""
            if "transformers generate" in results and c != "transformers generate":
                ratio = f" ({med / statistics.median(results['transformers generate'][n]):.2f}x)"
            cells.append(f"{med:>10.0f}{ratio:>12}")
        print(f"{n:>10} | " + " | ".join(cells))
    record = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "model": model, "dtype": args.dtype, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
        "tokens_per_s": {c: {str(n): {"median": statistics.median(v), "runs": v} for n, v in r.items()} for c, r in results.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

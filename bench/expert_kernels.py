"""An expert worker's two kernels for one step's experts: one packed oneDNN matmul pair per expert
against the C kernel over each layer's experts (`tarragon/kernels.py`, csrc/kernels.c), in one
process, one thread.

    .venv/bin/python bench/expert_kernels.py [--model DIR] [--rows 2 8 16 32 64 128] [--repeats 15]

Each cell: every sparse layer of the model, all its experts on one bank (as a packed expert
worker holds them), R rows per layer routed as R/2 random tokens at top-2; 64 MB of other memory
is read between repeats, so the weights come from DRAM as in a running cluster, where attention
and the other worker evict them. Median ms over --repeats; the rows' outputs are compared too.
Writes docs/results/expert_kernels.json (and .txt).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon.bench.experiments import experiment_header, median_us, write_results  # noqa: E402
from tarragon.config import ModelConfig  # noqa: E402
from tarragon.kernels import c_kernels  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402
from tarragon.model import ExpertBank  # noqa: E402
from tarragon.weights import WeightFiles  # noqa: E402


def load(model: str, cfg: ModelConfig, fused: bool) -> ExpertBank:
    os.environ["TARRAGON_MATMUL_KERNEL"] = "auto" if fused else "torch"
    with WeightFiles(model) as files:
        bank = ExpertBank(cfg, files, [(layer, e) for layer in cfg.sparse_layers for e in range(cfg.num_experts)], torch.float32)
    assert bool(bank.fused) == fused
    return bank


def routed_rows(cfg: ModelConfig, rows: int, g: torch.Generator) -> tuple[torch.Tensor, list[int], list[int]]:
    """R rows grouped by expert, as R/2 tokens routed to top-2 distinct experts make them."""
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[: cfg.top_k] for _ in range(max(1, rows // cfg.top_k))]).flatten()
    experts = sorted(set(ids.tolist()))
    counts = [int((ids == e).sum()) for e in experts]
    return torch.randn(sum(counts), cfg.hidden_size, generator=g), experts, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16, 32, 64, 128])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="docs/results/expert_kernels.json")
    args = ap.parse_args()
    if c_kernels() is None:
        sys.exit("the C expert kernel is not built here (no C compiler?)")
    torch.set_num_threads(1)
    model = args.model or str(demo_model())
    cfg = ModelConfig.from_dir(model)
    record = experiment_header("an expert worker's kernels: per-expert oneDNN vs the C kernel over a layer's experts", model,
                               f"all {len(cfg.sparse_layers)} sparse layers x {cfg.num_experts} experts on one bank, "
                               f"R rows per layer (top-{cfg.top_k}), cold weights, one thread; median of {args.repeats}")
    banks = {"per-expert": load(model, cfg, False), "fused": load(model, cfg, True)}
    flush = torch.ones(16 << 20)  # 64 MB
    g = torch.Generator().manual_seed(0)
    results, lines = {}, [f"{'rows':>5} | {'per-expert ms':>13} | {'fused ms':>8} | speed-up | max |diff|"]
    with torch.inference_mode():
        for rows in args.rows:
            x, experts, counts = routed_rows(cfg, rows, g)
            ms = {k: median_us(lambda b=b: [b.run_layer(layer, experts, counts, x) for layer in cfg.sparse_layers], args.repeats, flush) / 1e3
                  for k, b in banks.items()}
            diff = float((banks["fused"].run_layer(cfg.sparse_layers[0], experts, counts, x)
                          - banks["per-expert"].run_layer(cfg.sparse_layers[0], experts, counts, x)).abs().max())
            results[rows] = {**ms, "speedup": ms["per-expert"] / ms["fused"], "max_abs_diff": diff}
            lines.append(f"{rows:>5} | {ms['per-expert']:>13.2f} | {ms['fused']:>8.2f} | {ms['per-expert'] / ms['fused']:>7.2f}x | {diff:.1e}")
    record["results"] = results
    write_results(record, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()

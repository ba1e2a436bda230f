"""The attention worker's matmuls (q/k/v, output projection, router, LM head) of the bench model:
the C kernel of `tarragon/kernels.py` (csrc/kernels.c, weights packed at load) against oneDNN's
packed weights and torch's `F.linear` (MKL), at decode and prefill row counts.

    .venv/bin/python bench/linear_kernels.py [--model DIR] [--rows 1 8 32 64 256 1024] [--repeats 15]

Each cell: the median us of one call over --repeats, with 64 MB of other memory read before each
(the weights cold, as in a running cluster where the expert workers' weights evict them). The LM
head also on two threads (the attention worker gives it two while the expert workers wait).
Outputs are compared with F.linear. Writes docs/results/linear_kernels.json (and .txt).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the workers (launcher.py): idle OpenMP threads sleep
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon.bench.experiments import experiment_header, median_us, write_results  # noqa: E402
from tarragon.config import ModelConfig  # noqa: E402
from tarragon.kernels import Linear, c_kernels, threads  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint whose shapes are used (default: the bench-size demo model)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="docs/results/linear_kernels.json")
    args = ap.parse_args()
    if c_kernels() is None:
        sys.exit("the C kernels are not built here (no C compiler?)")
    model = args.model or str(demo_model())
    cfg = ModelConfig.from_dir(model)
    H = cfg.hidden_size
    shapes = {"qkv": ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, H), "o": (H, cfg.num_heads * cfg.head_dim),
              "router": (cfg.num_experts, H), "lm_head": (cfg.vocab_size, H)}
    record = experiment_header("the attention worker's matmuls: C kernel vs oneDNN vs F.linear", model,
                               f"random weights of the model's shapes {shapes}, R rows, cold weights; median of {args.repeats}")
    flush = torch.ones(16 << 20)  # 64 MB
    g = torch.Generator().manual_seed(0)
    results: dict = {}
    lines = [f"{'matmul':>8} | {'rows':>5} | {'C us':>7} | {'oneDNN us':>9} | {'F.linear us':>11} | C speed-up vs best other | max |diff|"]
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=g) * k ** -0.5
        c, onednn = Linear(w), torch.ops.mkldnn._reorder_linear_weight(w)
        for th in (1, 2) if name == "lm_head" else (1,):
            for rows in args.rows:
                x = torch.randn(rows, k, generator=g)
                with threads(th):
                    us = {"C": median_us(lambda: c(x), args.repeats, flush),
                          "oneDNN": median_us(lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""), args.repeats, flush),
                          "F.linear": median_us(lambda: F.linear(x, w), args.repeats, flush)}
                    diff = float((c(x) - F.linear(x, w)).abs().max())
                key = f"{name}" + (f" ({th} threads)" if name == "lm_head" else "")
                results.setdefault(key, {})[rows] = {**us, "max_abs_diff": diff}
                best = min(us["oneDNN"], us["F.linear"])
                lines.append(f"{key:>8} | {rows:>5} | {us['C']:>7.0f} | {us['oneDNN']:>9.0f} | {us['F.linear']:>11.0f} | "
                             f"{best / us['C']:>23.2f}x | {diff:.1e}")
    record["results"] = results
    write_results(record, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()

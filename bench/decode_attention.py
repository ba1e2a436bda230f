"""An attention worker's decode attention for one layer: gather + SDPA (torch) against the paged
kernel (`tarragon/paged_attention.py`), in one process, one thread.

    .venv/bin/python bench/decode_attention.py [--model DIR] [--batches 1 8 32 64] [--contexts 66 200]
                                                [--repeats 50]

Each cell: B sequences of C cached tokens each (the last few sequences 3 shorter: padding), their
blocks scattered over the pool, the model's heads and head size; median us per layer, warm
(everything in cache) and cold (64 MB of other memory read first, as the other layers and the
expert worker evict the cache in a running cluster). The outputs are compared too.
Writes docs/results/decode_attention.json (and .txt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import paged_attention  # noqa: E402
from tarragon.bench.experiments import experiment_header, median_us, write_results  # noqa: E402
from tarragon.config import ModelConfig  # noqa: E402
from tarragon.make_model import demo_model  # noqa: E402
from tarragon.model import gather_blocks  # noqa: E402
from torch.nn.functional import scaled_dot_product_attention  # noqa: E402

BLOCK = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[66, 200])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="docs/results/decode_attention.json")
    args = ap.parse_args()
    if not paged_attention.available():
        sys.exit("the paged attention kernel could not be built (no C compiler?)")
    torch.set_num_threads(1)
    model = args.model or str(demo_model())
    cfg = ModelConfig.from_dir(model)
    (kvh, d), (_, dv) = cfg.kv_shapes()
    nh, scale = cfg.num_heads, cfg.head_dim ** -0.5
    record = experiment_header("decode attention of one layer: gather + SDPA vs the paged kernel", model,
                               f"{nh} query heads, {kvh} KV heads of {d}, blocks of {BLOCK} scattered over the pool; "
                               f"one thread; median of {args.repeats}, warm and after reading 64 MB")
    g = torch.Generator().manual_seed(0)
    pool_blocks = max(args.batches) * -(-max(args.contexts) // BLOCK) + 8
    k_pool, v_pool = torch.randn(pool_blocks * BLOCK, kvh, d, generator=g), torch.randn(pool_blocks * BLOCK, kvh, dv, generator=g)
    flush = torch.ones(16 << 20)  # 64 MB
    results, lines = {}, [f"{'B':>3} {'C':>4} | {'gather+SDPA us':>15} | {'paged us':>10} | {'speed-up':>9} | max |diff|",
                          f"{'':>8} | {'warm / cold':>15} | {'warm / cold':>10} | {'warm / cold':>11} |"]
    for C in args.contexts:
        for B in args.batches:
            nblk = -(-C // BLOCK)
            blocks = torch.randperm(pool_blocks, generator=g)[: B * nblk].view(B, nblk)
            lens = torch.full((B,), C, dtype=torch.long)
            lens[B - B // 4 :] -= 3
            q = torch.randn(B, nh, d, generator=g)
            mask = torch.zeros(B, C).masked_fill_(torch.arange(C)[None, :] >= lens[:, None], float("-inf"))[:, None, None, :]

            def gathered() -> torch.Tensor:
                k, v = gather_blocks(k_pool, blocks, BLOCK, C), gather_blocks(v_pool, blocks, BLOCK, C)
                out = scaled_dot_product_attention(q.view(B, kvh, -1, d), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
                return out.view(B, nh, dv)

            def paged() -> torch.Tensor:
                return paged_attention.decode_attention(q, k_pool, v_pool, blocks, lens, BLOCK, scale)

            us = {f"{name}_{temp}": median_us(fn, args.repeats, flush if temp == "cold" else None)
                  for name, fn in (("sdpa", gathered), ("paged", paged)) for temp in ("warm", "cold")}
            diff = float((gathered() - paged()).abs().max())
            results[f"{B}x{C}"] = {**us, "speedup_warm": us["sdpa_warm"] / us["paged_warm"],
                                   "speedup_cold": us["sdpa_cold"] / us["paged_cold"], "max_abs_diff": diff}
            lines.append(f"{B:>3} {C:>4} | {us['sdpa_warm']:>6.0f} / {us['sdpa_cold']:>6.0f} | {us['paged_warm']:>4.0f} / {us['paged_cold']:>4.0f}"
                         f" | {us['sdpa_warm'] / us['paged_warm']:>3.1f}x / {us['sdpa_cold'] / us['paged_cold']:>3.1f}x | {diff:.1e}")
    record["results"] = results
    write_results(record, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()

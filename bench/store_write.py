"""CPU a checkpoint store spends per decode step, in-process (no cluster): `CheckpointStore.write`
driven with KVWrites shaped as a real decode step of the bench demo model (4 layers, 4 KV heads,
head_dim 32, fp32), and the same through the receive path (`P.decode`, tensors, `check_write`).

Each run: a prefill write (every request from position 0, `--prompt` tokens), `--steps` decode
steps of one token per request, then one write that drops them all. Reports, median over
`--runs`, the mean CPU microseconds (this thread's CPU time, robust to a shared machine) per
decode-step write, which is what a step costs the store, growth included, and the median one;
checks that every restore returns exactly the KV written.

    .venv/bin/python bench/store_write.py [--requests 64] [--steps 80] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import protocol as P  # noqa: E402
from tarragon.checkpoint_store import CheckpointStore, check_write  # noqa: E402
from tarragon.sockets import Received  # noqa: E402

LAYERS, HEADS, DIM = 4, 4, 32


def message(seq: int, ids: list[str], starts: list[int], counts: list[int], fill: float,
            finished: list[str] | None = None) -> tuple[P.KVWrite, torch.Tensor, torch.Tensor]:
    n = sum(counts)
    k = torch.arange(LAYERS * n * HEADS * DIM, dtype=torch.float32).reshape(LAYERS, n, HEADS, DIM) + fill
    v = -k
    return P.KVWrite(seq, ids, starts, counts, P.tensor_meta(k), P.tensor_meta(v), finished or []), k, v


def one_run(requests: int, prompt: int, steps: int, wire: bool) -> list[float]:
    """Microseconds per decode-step write; asserts the restores are exact."""
    store = CheckpointStore(1 << 32)
    ids = [f"r{i}" for i in range(requests)]
    steps_msgs = [message(0, ids, [0] * requests, [prompt] * requests, 0.0)]
    steps_msgs += [message(s, ids, [prompt + s - 1] * requests, [1] * requests, float(s)) for s in range(1, steps + 1)]
    frames = [P.encode(m, k, v) for m, k, v in steps_msgs] if wire else []
    times = []
    for i, (m, k, v) in enumerate(steps_msgs):
        t0 = time.thread_time()  # CPU time: robust to a shared machine
        if wire:
            msg, bufs = P.decode(frames[i])
            got = Received("aw0", msg, bufs, b"aw0", P.tensors(msg, bufs))
            check_write(got)
            store.write("aw0", got.msg, *got.tensors)
        else:
            store.write("aw0", m, k, v)
        times.append((time.thread_time() - t0) * 1e6)
    for j in (0, requests // 2, requests - 1):
        n, rk, rv = store.restore(ids[j])
        want = torch.cat([k[:, j * c:(j + 1) * c] for m, k, _ in steps_msgs for c in [m.counts[j]]], dim=1)
        assert n == prompt + steps and torch.equal(rk, want) and torch.equal(rv, -want), f"restore of {ids[j]} is wrong"
    held = sum(cp.nbytes for cp in store.requests.values())
    assert store.bytes == held, (store.bytes, held)
    store.write("aw0", *message(steps + 1, [], [], [], 0.0, ids)[:1], *message(0, [], [], [], 0.0)[1:])
    assert store.bytes == 0 and not store.requests
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for wire in (False, True):
        runs = [one_run(args.requests, args.prompt, args.steps, wire) for _ in range(args.runs)]
        means, meds = [statistics.fmean(r) for r in runs], [statistics.median(r) for r in runs]
        what = "decode + check + write" if wire else "CheckpointStore.write"
        print(f"{what:24s} {args.requests} requests x 1 token, CPU us per step: mean {statistics.median(means):5.0f} "
              f"(runs: {', '.join(f'{m:.0f}' for m in means)}), median {statistics.median(meds):5.0f}; restores exact")


if __name__ == "__main__":
    main()

"""CPU a checkpoint store spends per decode step, in-process (no cluster): KVWrites shaped as a
real decode step of the bench demo model (4 layers, 4 KV heads, head_dim 32, fp32), into
`CheckpointStore.write` directly, and through the store's receive path (an ipc socket, `recv`,
`check_write`, `serve`), with warm caches and with cold ones (32 MB touched and a 2 ms sleep
between writes, as when the attention and expert workers share the cores: per-message code then
costs several times more).

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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import protocol as P  # noqa: E402
from tarragon.checkpoint_store import CheckpointStore, take_messages  # noqa: E402
from tarragon.sockets import DATA_MAX_BYTES, Context, make_socket  # noqa: E402

LAYERS, HEADS, DIM = 4, 4, 32
MODES = ("write", "receive", "receive, cold caches")


def message(seq: int, ids: list[str], starts: list[int], counts: list[int], fill: float,
            finished: list[str] | None = None) -> tuple[P.KVWrite, torch.Tensor, torch.Tensor]:
    n = sum(counts)
    k = torch.arange(LAYERS * n * HEADS * DIM, dtype=torch.float32).reshape(LAYERS, n, HEADS, DIM) + fill
    v = -k
    return P.KVWrite(seq, ids, starts, counts, P.tensor_meta(k), P.tensor_meta(v), finished or []), k, v


class Link:
    """An attention worker's socket to the store's, over ipc as in a local cluster."""

    def __init__(self, ctx: Context, folder: str):
        endpoint = f"ipc://{folder}/store"
        self.store = make_socket(ctx, zmq.ROUTER, bind=endpoint, max_bytes=DATA_MAX_BYTES)
        self.aw = make_socket(ctx, zmq.DEALER, connect=endpoint, identity="aw0", max_bytes=DATA_MAX_BYTES)

    def send(self, m: P.KVWrite, k: torch.Tensor, v: torch.Tensor) -> None:
        self.aw.send_multipart(P.encode(m, k, v), copy=False)
        assert self.store.poll(5000), "the write did not arrive"


def one_run(requests: int, prompt: int, steps: int, mode: str, link: Link, cache: np.ndarray) -> list[float]:
    """CPU microseconds per decode-step write; asserts the restores are exact."""
    store = CheckpointStore(1 << 32)
    ids = [f"r{i}" for i in range(requests)]
    writes = [message(0, ids, [0] * requests, [prompt] * requests, 0.0)]
    writes += [message(s, ids, [prompt + s - 1] * requests, [1] * requests, float(s)) for s in range(1, steps + 1)]
    times = []
    for m, k, v in writes:
        if mode != "write":
            link.send(m, k, v)
        if mode.endswith("cold caches"):
            cache[::64] += 1
            time.sleep(0.002)
        t0 = time.thread_time()
        if mode == "write":
            store.write("aw0", m, k, v)
        else:
            take_messages(store, link.store, "store")
        times.append((time.thread_time() - t0) * 1e6)
    for j in (0, requests // 2, requests - 1):
        n, rk, rv = store.restore(ids[j])
        want = torch.cat([k[:, j * c:(j + 1) * c] for m, k, _ in writes for c in [m.counts[j]]], dim=1)
        assert n == prompt + steps and torch.equal(rk, want) and torch.equal(rv, -want), f"restore of {ids[j]} is wrong"
    assert store.bytes == sum(cp.nbytes for cp in store.requests.values())
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
    ctx = Context(None)
    cache = np.ones(32 << 20, np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        link = Link(ctx, folder)
        for mode in MODES:
            runs = [one_run(args.requests, args.prompt, args.steps, mode, link, cache) for _ in range(args.runs)]
            means, meds = [statistics.fmean(r) for r in runs], [statistics.median(r) for r in runs]
            print(f"{mode:21s} {args.requests} requests x 1 token, CPU us per write: mean {statistics.median(means):5.0f} "
                  f"(runs: {', '.join(f'{m:.0f}' for m in means)}), median {statistics.median(meds):5.0f}; restores exact")
        link.aw.close(linger=0)
        link.store.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()

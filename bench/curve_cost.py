"""What CURVE costs the datapath: attention-worker -> expert-worker round trips, CURVE on and off.

An echo server in its own process stands for an expert worker (ROUTER, bound); the client is a
DEALER as in the forwarding engine; both come from `tarragon.sockets.make_socket`, so this is the
cluster's own socket set-up. Prints the median round trip per payload size and the on/off ratio.

    .venv/bin/python bench/curve_cost.py [--transport ipc|tcp] [--trips 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time

import zmq

from tarragon.sockets import DATA_MAX_BYTES, ClusterKey, Context, make_socket


def echo(endpoint: str, key: ClusterKey | None, ready) -> None:
    ctx = Context(key)
    s = make_socket(ctx, zmq.ROUTER, bind=endpoint, max_bytes=DATA_MAX_BYTES)
    ready.set()
    while True:
        frames = s.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            break
        s.send_multipart(frames, copy=False)
    ctx.destroy(0)


def round_trips(endpoint: str, key: ClusterKey | None, payload: bytes, trips: int) -> float:
    """Median seconds per round trip of `payload` (a header frame and a tensor frame)."""
    ctx = Context(key)
    s = make_socket(ctx, zmq.DEALER, connect=endpoint, identity="aw0", max_bytes=DATA_MAX_BYTES)
    times = []
    for _ in range(trips):
        t = time.perf_counter()
        s.send_multipart([b"h" * 40, payload], copy=False)
        s.recv_multipart(copy=False)
        times.append(time.perf_counter() - t)
    s.send_multipart([b"stop"])
    ctx.destroy(0)
    return statistics.median(times[trips // 10:])  # after warm-up


def measure(transport: str, curve: bool, payload: bytes, trips: int) -> float:
    key = ClusterKey.generate() if curve else None
    endpoint = f"ipc://{tempfile.mktemp(prefix='curve-')}" if transport == "ipc" else "tcp://127.0.0.1:%d"
    if transport == "tcp":
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            endpoint %= probe.getsockname()[1]
    ready = mp.Event()
    server = mp.Process(target=echo, args=(endpoint, key, ready))
    server.start()
    ready.wait(30)
    try:
        return round_trips(endpoint, key, payload, trips)
    finally:
        server.join(10)
        server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    p.add_argument("--trips", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", default="2048,65536,1048576", help="payload bytes (a decode step's rows of one expert worker)")
    args = p.parse_args()
    for size in (int(x) for x in args.sizes.split(",")):
        payload = bytes(size)
        off, on = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            off.append(measure(args.transport, False, payload, args.trips))
            on.append(measure(args.transport, True, payload, args.trips))
        m_off, m_on = statistics.median(off), statistics.median(on)
        print(f"{args.transport} {size:>8} B: round trip {m_off * 1e6:7.1f} us plain, {m_on * 1e6:7.1f} us CURVE, "
              f"ratio {m_on / m_off:.2f} (median of {args.repeats} x {args.trips})", flush=True)


if __name__ == "__main__":
    main()

"""What CURVE costs the datapath: attention-worker -> expert-worker round trips, CURVE on and off.

An echo server in its own process stands for an expert worker (ROUTER, bound); the client is a
DEALER as in the forwarding engine; both come from `tarragon.sockets.make_socket`, so this is the
cluster's own socket set-up. Prints the median round trip per payload size and the on/off ratio.
`--cluster` measures instead a whole cluster over tcp (workers joined by hand, as on many hosts):
decode throughput with CURVE on and off, alternating, median of `--repeats`.

    .venv/bin/python bench/curve_cost.py [--transport ipc|tcp] [--trips 2000] [--repeats 5]
    .venv/bin/python bench/curve_cost.py --cluster [--repeats 3]
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


def cluster_throughput(model: str, curve: bool, tmp: str, requests: int = 16, tokens: int = 64) -> float:
    """Output tokens/s of a manual cluster over tcp (1 AW, 2 EWs, the store), CURVE on or off."""
    import socket
    import subprocess
    import sys

    from tarragon import LLM, SamplingParams

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    key_file = f"{tmp}/key-{time.monotonic_ns()}"
    ClusterKey.generate().save(key_file)
    flags = ["--key-file", key_file] if curve else ["--insecure-transport"]
    procs = [subprocess.Popen([sys.executable, "-m", "tarragon", "worker", "--role", role, "--join", address, *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for role in ("store", "expert", "expert", "attention")]
    try:
        with LLM(model, attention_workers=1, expert_workers=2, launcher="manual", join_address=address,
                 key_file=key_file if curve else None, insecure_transport=not curve) as llm:
            params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            prompts = [[5 + i, 6, 7, 8 + i] for i in range(requests)]
            llm.generate(prompts[:2], params)  # warm-up
            t = time.perf_counter()
            llm.generate(prompts, params)
            return requests * tokens / (time.perf_counter() - t)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main_cluster(repeats: int) -> None:
    from tarragon.make_model import make_model

    tmp = tempfile.mkdtemp(prefix="curve-cost-")
    model = str(make_model(f"{tmp}/model", "mixtral", "bench", seed=0))
    off, on = [], []
    for _ in range(repeats):
        off.append(cluster_throughput(model, False, tmp))
        on.append(cluster_throughput(model, True, tmp))
        print(f"tok/s plain {off[-1]:.0f}, CURVE {on[-1]:.0f}", flush=True)
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"cluster over tcp (bench model, 16 x 64 tokens): {m_off:.0f} tok/s plain, {m_on:.0f} tok/s CURVE, "
          f"ratio {m_on / m_off:.3f} (median of {repeats})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    p.add_argument("--trips", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", default="2048,65536,1048576", help="payload bytes (a decode step's rows of one expert worker)")
    p.add_argument("--cluster", action="store_true", help="decode throughput of a tcp cluster instead of round trips")
    args = p.parse_args()
    if args.cluster:
        return main_cluster(args.repeats)
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

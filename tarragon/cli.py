"""Command line: `tarragon generate | serve | bench | worker | make-model` (also `python -m tarragon`)."""

from __future__ import annotations

import argparse
import sys
import time

from .config import SUPPORTED_FAMILIES


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a checkpoint folder in Hugging Face layout, or a Hub id (org/name) resolved into the "
                                    "Hugging Face cache (default: a random-weight demo model)")
    p.add_argument("--attention-workers", type=int, default=2, help="attention worker processes (they hold the KV cache)")
    p.add_argument("--expert-workers", type=int, default=2, help="expert worker processes (they hold the experts)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations; auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each GPU worker gets a GPU of its own while they last)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context limit in tokens (prompt + output)")
    p.add_argument("--log-dir", default=None, help="keep every worker's log here after shutdown (default: deleted with the run)")
    p.add_argument("--shadows", type=int, default=1, help="inactive copies of each expert on other expert workers")
    p.add_argument("--recovery", default="tarragon", choices=["tarragon", "recompute", "restart"],
                   help="what an attention worker's failure costs: restore KV, re-prefill, or restart everything")
    p.add_argument("--no-checkpoint", action="store_true", help="no KV checkpointing (an attention worker's failure re-prefills)")
    p.add_argument("--probe-interval-s", type=float, default=0.01,
                   help="probe a silent expert worker after this long (a large value turns probing off)")
    p.add_argument("--launcher", default="local", choices=["local", "ray", "manual"],
                   help="local: worker processes here; ray: Ray actors on the cluster's nodes; manual: workers join by hand")
    p.add_argument("--ray-address", default=None, help="ray: the cluster to use (default: $RAY_ADDRESS or a new local one)")
    p.add_argument("--join-address", default=None, help="manual: tcp://HOST:PORT where `tarragon worker --join` finds us")
    p.add_argument("--node", action="append", default=[], metavar="WORKER=NODE",
                   help="WORKER (ew0, aw1, store) runs on NODE (ray: a resource only that node has); shadows avoid their primary's node")
    add_key_args(p, "the cluster's CURVE key: read if the file exists, else a new one written there (0600); "
                    "copy it to the hosts of workers that join by hand (default: a new key in the private run folder)")


def add_key_args(p: argparse.ArgumentParser, key_help: str) -> None:
    p.add_argument("--key-file", default=None, help=key_help)
    p.add_argument("--insecure-transport", action="store_true",
                   help="no CURVE authentication or encryption on the cluster's sockets: only on an isolated network")


def start_llm(args: argparse.Namespace):
    """The cluster that `add_cluster_args` describes."""
    from . import LLM

    return LLM(args.model, log_dir=args.log_dir, attention_workers=args.attention_workers, expert_workers=args.expert_workers, device=args.device,
               dtype=args.dtype, max_model_len=args.max_model_len, shadows=args.shadows, recovery=args.recovery,
               checkpoint=not args.no_checkpoint, probe_interval_s=args.probe_interval_s, launcher=args.launcher,
               ray_address=args.ray_address, join_address=args.join_address, nodes=dict(n.split("=", 1) for n in args.node),
               key_file=args.key_file, insecure_transport=args.insecure_transport)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompts = args.prompt or ["The quick brown fox", "def fibonacci(n):", "import numpy as np", "class Server:"]
    with start_llm(args) as llm:
        print(f"workers: {', '.join(f'{w.name}(pid {w.pid})' for w in llm.workers())}")
        t0 = time.monotonic()
        outs = llm.generate(prompts, params)
        elapsed = time.monotonic() - t0
        total = 0
        for o in outs:
            total += len(o.token_ids)
            print(f"\n--- prompt: {o.prompt if o.prompt is not None else o.prompt_token_ids}")
            print(f"tokens ({len(o.token_ids)}, finish={o.finish_reason}): {o.token_ids}")
            print(f"text: {o.text!r}")
        print(f"\n{len(outs)} requests, {total} tokens in {elapsed:.2f} s: {total / elapsed:.1f} tokens/s")
        if args.failover:
            failover_demo(llm, prompts, params, outs)
    return 0


def max_gap(outs) -> float:
    """The largest gap between consecutive tokens of any of the outputs (seconds)."""
    return max((b - a for o in outs for a, b in zip(o.token_times, o.token_times[1:])), default=0.0)


def kill_under_load(llm, prompts, params, reference, role: str) -> dict:
    """Rerun `prompts` and SIGKILL a worker of `role` (an attention worker that holds requests) a
    third of the way in; returns the victim, the events since, whether every output equals
    `reference`, and the stall: the largest token gap minus the reference run's."""
    reqs = [llm.submit(p, params) for p in prompts]
    while min(len(r.tokens) for r in reqs) < max(1, params.max_tokens // 3):
        time.sleep(0.001)
    busy = {r.worker for r in reqs if not r.done.is_set()}
    victim = next(w.name for w in llm.workers() if w.role == role and w.state == "ready" and (role == "expert" or w.name in busy))
    seen = len(llm.events())
    killed_at = time.monotonic()
    llm.kill(victim)
    outs = [llm.wait(r, 300) for r in reqs]
    deadline = time.monotonic() + 120
    while any(w.state == "starting" for w in llm.workers()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the replacement joins before the next measurement
    return {"victim": victim, "killed_at": killed_at, "events": llm.events()[seen:], "stall_ms": 1000 * (max_gap(outs) - max_gap(reference)),
            "tokens_identical": [o.token_ids for o in outs] == [o.token_ids for o in reference]}


def failover_demo(llm, prompts, params, reference) -> None:
    """Run the same prompts twice more: SIGKILL an expert worker, then an attention worker, a
    third of the way in; report what happened and the stall."""
    for role in ("expert", "attention"):
        print(f"\n=== failover: the same prompts again; an {role} worker gets SIGKILL a third of the way in ===")
        r = kill_under_load(llm, prompts, params, reference, role)
        print(f"  killed {r['victim']}")
        for e in r["events"]:
            print(f"  event +{1000 * (e.t - r['killed_at']):4.0f} ms: {e.kind:<20} {e.worker:<8} {e.detail} {f'({e.ms:.1f} ms)' if e.ms else ''}")
        print(f"every request finished; tokens identical to the failure-free run: {r['tokens_identical']}")
        print(f"stall (largest token gap minus the failure-free run's): {r['stall_ms']:.1f} ms")


def cmd_serve(args: argparse.Namespace) -> int:
    """Port first (a busy one fails before any worker starts), then the cluster, then HTTP; exits
    non-zero when start-up fails or the cluster stops being able to serve."""
    import logging
    import os

    from .config import ModelLoadError
    from .server import listen_socket, serve

    if args.model_pos and args.model and args.model_pos != args.model:
        print(f"tarragon: error: two models given: {args.model_pos} and --model {args.model}", file=sys.stderr)
        return 2
    args.model = args.model_pos or args.model
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("tarragon.serve")
    api_key = args.api_key or os.environ.get("TARRAGON_API_KEY")  # the environment keeps it out of `ps`
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        print(f"tarragon: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    with sock:
        name = args.served_model_name or args.model or "tarragon-demo"
        log.info("starting %d attention + %d expert workers for %s", args.attention_workers, args.expert_workers, args.model or "the demo model")
        try:
            llm = start_llm(args)
        except ModelLoadError:
            raise
        except (RuntimeError, TimeoutError) as e:  # a worker failed or hung during start-up
            print(f"tarragon: error: the cluster did not start: {e}", file=sys.stderr)
            return 1
        with llm:
            log.info("serving %r on http://%s:%d/v1 with %s", name, args.host, args.port,
                     ", ".join(f"{w.name}(pid {w.pid})" for w in llm.workers()))
            return serve(llm, name, args.host, args.port, api_key, args.max_queue, args.enable_fault_injection, sock=sock)


def cmd_worker(args: argparse.Namespace) -> int:
    from .sockets import ClusterKey
    from .worker import join

    if not args.key_file and not args.insecure_transport:
        raise ValueError("a worker needs the cluster's key: --key-file (the file `serve --key-file` wrote)")
    key = None if args.insecure_transport else ClusterKey.load(args.key_file)
    return join(args.join, args.role, key, args.host, args.timeout)


def cmd_make_model(args: argparse.Namespace) -> int:
    from .make_model import make_model

    out = make_model(args.out, args.family, args.size, seed=args.seed, shard_bytes=args.shard_bytes, mxfp4=args.mxfp4)
    print(f"wrote {args.family} ({args.size}) checkpoint to {out}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, except where its help already tells it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    fmt = HelpFormatter
    parser = argparse.ArgumentParser(prog="tarragon", description="Resilient Mixture-of-Experts serving", formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"tarragon {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text for some prompts on a local cluster", formatter_class=fmt)
    add_cluster_args(g)
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this mass")
    g.add_argument("--top-k", type=int, default=-1, help="sample among the k likeliest tokens (-1: all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one per request)")
    g.add_argument("--failover", action="store_true", help="then rerun twice: an expert, then an attention worker killed mid-way")
    g.add_argument("prompt", nargs="*", help="prompts (default: a few built-in ones)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible server on a local cluster", formatter_class=fmt)
    s.add_argument("model_pos", nargs="?", metavar="MODEL", help="as --model: a checkpoint folder or a Hugging Face Hub id")
    add_cluster_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (checked before any worker starts)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (also $TARRAGON_API_KEY, "
                                                    "which keeps the key out of `ps`)")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL as given)")
    s.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")
    s.add_argument("--enable-fault-injection", action="store_true",
                   help="expose POST /tarragon/fault (SIGKILL/SIGSTOP a worker) and GET /tarragon/events, for `tarragon bench`")
    s.set_defaults(func=cmd_serve)

    from .bench import add_bench_args, cmd_bench

    b = sub.add_parser("bench", help="load a server (a running one, or one it starts) with optional faults; report latencies and stalls",
                       formatter_class=fmt)
    add_cluster_args(b)
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    w = sub.add_parser("worker", help="start one worker by hand that joins a cluster (e.g. on another host)", formatter_class=fmt)
    w.add_argument("--role", required=True, choices=["attention", "expert", "store"], help="the kind of slot to fill")
    w.add_argument("--join", required=True, metavar="ADDR", help="the cluster's join address, tcp://HOST:PORT (its --join-address)")
    w.add_argument("--host", default=None, help="the address to serve on (default: this host's on the route to ADDR)")
    w.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds without a slot")
    add_key_args(w, "the cluster's CURVE key file (the one the cluster's `--key-file` names)")
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("make-model", help="write a random-weight checkpoint in Hugging Face layout", formatter_class=fmt)
    m.add_argument("--family", default="mixtral", choices=list(SUPPORTED_FAMILIES), help="architecture")
    m.add_argument("--size", default="tiny", choices=["tiny", "bench", "gpu"], help="tiny: tests; bench: benchmarks; gpu: a GPU's worth")
    m.add_argument("--seed", type=int, default=0, help="weights' random seed")
    m.add_argument("--shard-bytes", type=int, default=None, help="split into shards of about this many bytes")
    m.add_argument("--mxfp4", action="store_true", help="gpt_oss: expert matrices as MXFP4 blocks and scales, as released")
    m.add_argument("out", help="the folder to write")
    m.set_defaults(func=cmd_make_model)

    args = parser.parse_args(argv)
    from .config import ModelLoadError

    try:
        return args.func(args)
    except (ModelLoadError, ValueError, PermissionError) as e:
        print(f"tarragon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

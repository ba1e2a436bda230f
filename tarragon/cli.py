"""Command line: `tarragon generate | serve | bench | worker | make-model` (also `python -m tarragon`)."""

from __future__ import annotations

import argparse
import sys
import time

from .config import DTYPES, SUPPORTED_FAMILIES
from .faults import kill_under_load
from .vocabulary import EventKind, RecoveryPolicy, Role


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a checkpoint folder in Hugging Face layout, or a Hub id (org/name) resolved into the "
                                    "Hugging Face cache (default: a random-weight demo model)")
    p.add_argument("--attention-workers", type=int, default=2, help="attention worker processes (they hold the KV cache)")
    p.add_argument("--expert-workers", type=int, default=2, help="expert worker processes (they hold the experts)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations; auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cpu", help="cpu or cuda (each GPU worker gets a GPU of its own while they last)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context limit in tokens (prompt + output)")
    p.add_argument("--no-warmup", action="store_true",
                   help="start serving without a warm-up batch (faster start; the first large batches run slower)")
    p.add_argument("--log-dir", default=None, help="keep every worker's log here after shutdown (default: deleted with the run)")
    p.add_argument("--shadows", type=int, default=1, help="inactive copies of each expert on other expert workers")
    p.add_argument("--recovery", default="tarragon", choices=list(RecoveryPolicy),
                   help="what an attention worker's failure costs: restore KV, re-prefill (at once, or token by token: replay), "
                        "or restart everything")
    p.add_argument("--no-checkpoint", action="store_true", help="no KV checkpointing (an attention worker's failure re-prefills)")
    p.add_argument("--checkpoint-interval-ms", type=float, default=10.0,
                   help="steps' KV goes to the stores as one write per this long (0: a write each step); an attention "
                        "worker's failure regenerates the tokens of at most that long")
    p.add_argument("--stores", type=int, default=None,
                   help="KV checkpoint stores, each holding every checkpoint (default: 2 local, 1 with ray or manual)")
    p.add_argument("--placement", default="auto", choices=["auto", "pack", "spread"],
                   help="pack: requests on the first attention worker with room, the experts' primaries over one expert "
                        "worker per core, the others standing by; spread: over all of them; auto: pack when workers share cores")
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
               checkpoint=not args.no_checkpoint, checkpoint_interval_ms=args.checkpoint_interval_ms, stores=args.stores, placement=args.placement, probe_interval_s=args.probe_interval_s,
               launcher=args.launcher,
               ray_address=args.ray_address, join_address=args.join_address, nodes=dict(n.split("=", 1) for n in args.node),
               key_file=args.key_file, insecure_transport=args.insecure_transport, warmup=not args.no_warmup)


def cmd_generate(args: argparse.Namespace) -> int:
    """What matters first: the text and tokens/s; then, with --failover, the failover story."""
    from . import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompts = args.prompt or ["The quick brown fox", "def fibonacci(n):", "import numpy as np", "class Server:"]
    if args.model is None:
        print("model: the built-in demo model (Mixtral layout) with RANDOM weights: its text is gibberish; "
              "the point is how it is served")
    with start_llm(args) as llm:
        print(f"cluster: {args.attention_workers} attention workers, {args.expert_workers} expert workers, "
              f"{llm.shadows} shadow cop{'y' if llm.shadows == 1 else 'ies'} of each expert, {llm.config.resilience.stores} KV checkpoint store{'s' if llm.config.resilience.stores > 1 else ''}, an orchestrator")
        t0 = time.monotonic()
        outs = llm.generate(prompts, params)
        elapsed = time.monotonic() - t0
        total = sum(len(o.token_ids) for o in outs)
        print(f"{len(outs)} requests, {total} tokens in {elapsed:.2f} s: {total / elapsed:.0f} tokens/s")
        for o in outs:
            prompt = o.prompt if o.prompt is not None else str(o.prompt_token_ids)
            text = o.text if len(o.text) <= 60 else o.text[:57] + "..."
            print(f"  {prompt[:24]!r:<27} -> {text!r} ({len(o.token_ids)} tokens, {o.finish_reason})")
        if args.failover:
            print("\nfailover: the same prompts again, a worker SIGKILLed a third of the way in. Stall: the largest gap "
                  "between tokens across the failure.")
            for role in (Role.EXPERT, Role.ATTENTION):
                print(failover_line(role, kill_under_load(llm, prompts, params, outs, role)))
    if args.failover and args.recovery != "restart":
        print("for comparison, a cluster with --recovery restart (every worker restarted, every request rerun):")
        with start_llm(argparse.Namespace(**{**vars(args), "recovery": "restart"})) as llm:
            print(failover_line(Role.ATTENTION, kill_under_load(llm, prompts, params, outs, Role.ATTENTION)))
    return 0


def failover_line(role: str, r: dict) -> str:
    """One failure in one line: detection, what the cluster did, the stall, token identity."""
    from collections import Counter

    failed = next((e for e in r["events"] if e.kind == EventKind.WORKER_FAILED and e.worker == r["victim"]), None)
    detect = f"detected after {1000 * (failed.t - r['killed_at']):.0f} ms" if failed else "not detected"
    steps = Counter(e.kind for e in r["events"] if e.kind != EventKind.STALL)
    did = ", ".join(f"{k}{f' x{n}' if n > 1 else ''}" for k, n in steps.items())
    return (f"  {role} worker {r['victim']} killed: {detect}; stall {r['stall_ms']:.0f} ms (largest gap before: "
            f"{r['gap_before_ms']:.0f} ms); tokens identical to the failure-free run: {'yes' if r['tokens_identical'] else 'NO'}\n"
            f"    what happened: {did}")


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
            try:
                return serve(llm, name, args.host, args.port, api_key, args.max_queue, args.enable_fault_injection, sock=sock,
                             admin=args.enable_admin)
            except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C
                log.info("stopped by SIGINT; shutting the cluster down")
                return 130


def cmd_worker(args: argparse.Namespace) -> int:
    from .sockets import ClusterKey
    from .worker_main import join

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


def add_serve_parser(sub, fmt: type[argparse.HelpFormatter]) -> None:
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
    s.add_argument("--enable-admin", action="store_true",
                   help="expose POST /tarragon/drain {\"worker\": NAME} (a planned drain: rolling restarts); set --api-key too")
    s.set_defaults(func=cmd_serve)


def cluster_argv(args: argparse.Namespace) -> list[str]:
    """The `tarragon serve` flags that rebuild the cluster `args` describes: every flag of
    `add_cluster_args` whose value is not its default, each spelled as its destination with dashes
    (--attention-workers for attention_workers; tests/test_bench.py checks the round trip)."""
    p = argparse.ArgumentParser(add_help=False)
    add_cluster_args(p)
    argv: list[str] = []
    for dest, default in vars(p.parse_args([])).items():
        value, flag = getattr(args, dest), "--" + dest.replace("_", "-")
        if value == default:
            continue
        if isinstance(value, bool):
            argv.append(flag)
        elif isinstance(value, list):  # a repeatable option, e.g. --node
            argv += [x for v in value for x in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    return argv


def add_bench_parser(sub, fmt: type[argparse.HelpFormatter]) -> None:
    """`tarragon bench`: its own flags, and the cluster flags of the server it starts when given no
    running one (handed to it as `tarragon serve` arguments, so bench never reads cluster flags)."""
    from .bench.command import add_bench_args, cmd_bench

    b = sub.add_parser("bench", help="load a server (a running one, or one it starts) with optional faults; report latencies and stalls",
                       formatter_class=fmt)
    add_cluster_args(b)
    add_bench_args(b)
    b.set_defaults(func=lambda args: cmd_bench(args, cluster_argv(args)))


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

    add_serve_parser(sub, fmt)

    add_bench_parser(sub, fmt)

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

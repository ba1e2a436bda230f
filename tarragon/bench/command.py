"""`tarragon bench`: `vllm bench serve`'s flags (those that apply here) plus --fault, --duration
and --plot; against a running server, or one it starts with the cluster flags it was given.

The command only wires the other modules together: which requests (`workload`), sent how
(`client`), reported how (`report`, `plot`), against which server (`server`). It does not know
the cluster's flags: the CLI hands it the `tarragon serve` arguments to start one with.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..faults import Fault
from .client import run_load
from .plot import plot_timelines
from .report import METRICS, format_report, machine, parse_goodput, run_json, summarize, vllm_result, write_json
from .server import Server, server_info
from .workload import BUILTIN_DATASET, BenchRequest, random_requests, sharegpt_requests


def make_requests(args: argparse.Namespace, info: dict[str, Any], n: int, url: str = "") -> list[BenchRequest]:
    """The dataset that --dataset-name / --dataset-path / --random-* ask for; for chat, random
    token ids become text through the server's /detokenize (as vLLM decodes them)."""
    if args.dataset_name == "random":
        vocab = info.get("vocab_size") or _tokenizer(args).vocab_size
        reqs = random_requests(n, args.random_input_len, args.random_output_len, vocab, args.seed, args.random_range_ratio)
        if "chat" in getattr(args, "endpoint", ""):
            import httpx

            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            for r in reqs:
                r.prompt = httpx.post(f"{url}/detokenize", json={"tokens": r.prompt}, headers=headers, timeout=30).json()["prompt"]
        return reqs
    path = BUILTIN_DATASET if args.dataset_name == "builtin" else args.dataset_path
    if not path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path FILE")
    return sharegpt_requests(path, n, _tokenizer(args), info.get("max_model_len", 2048), args.sharegpt_output_len, args.seed)


def _tokenizer(args: argparse.Namespace):
    """The model's tokenizer, to measure prompts and replies (the demo model's by default)."""
    from ..make_model import demo_model
    from ..tokenizer import Tokenizer

    return Tokenizer(args.tokenizer or args.model or demo_model())



def add_bench_args(p: argparse.ArgumentParser) -> None:
    """`vllm bench serve`'s flags (those that apply here), plus --fault, --duration and --plot."""
    p.add_argument("--backend", default="openai", choices=["openai", "openai-chat", "vllm"],
                   help="openai/vllm: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--endpoint", default=None, help="the API path (default: the backend's)")
    p.add_argument("--base-url", default=None, help="a running server (default: --host/--port if given, else start one with the "
                                                    "cluster arguments above)")
    p.add_argument("--host", default=None, help="a running server's host (with --port; default: start a server)")
    p.add_argument("--port", type=int, default=None, help="a running server's port (default host: 127.0.0.1)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY if set)")
    p.add_argument("--served-model-name", default=None, help="the model name sent (default: the server's /v1/models entry)")
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "builtin"],
                   help="random token ids of fixed lengths; a ShareGPT JSON file (--dataset-path); a small built-in conversation set")
    p.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file for --dataset-name sharegpt")
    p.add_argument("--tokenizer", default=None, help="checkpoint folder whose tokenizer measures text prompts (default: --model)")
    p.add_argument("--random-input-len", type=int, default=10, help="prompt tokens (random dataset)")
    p.add_argument("--random-output-len", type=int, default=128, help="tokens to generate per request (random dataset)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)] (random dataset)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override each reply's length")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    p.add_argument("--duration", type=float, default=None, help="stop sending new requests after this many seconds")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 is Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--ignore-eos", action="store_true", help="accepted for vllm bench serve's sake: requests always ignore EOS here, "
                                                             "so each has exactly the length asked for")
    p.add_argument("--fault", action="append", default=[], metavar="[hang:]ROLE:INDEX@TIME",
                   help="e.g. expert:1@20s, attention:0@40s, hang:expert:2@30s (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrival times")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="comma-separated metrics to report percentiles of "
                                                                          "(ttft, tpot, itl, e2el)")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles to report, e.g. 25,50,99")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for request goodput, e.g. ttft:500 tpot:50 (milliseconds; keys ttft, tpot, e2el)")
    p.add_argument("--save-result", action="store_true", help="write vllm bench serve's result JSON (plus our fault records)")
    p.add_argument("--save-detailed", action="store_true", help="with --save-result: add per-request lengths, TTFTs, ITLs, texts")
    p.add_argument("--result-dir", default=None, help="folder of the result JSON (default: the current one)")
    p.add_argument("--result-filename", default=None, help="name of the result JSON (default: BACKEND-RATEqps-MODEL-DATE.json)")
    p.add_argument("--result-file", default=None, help="write the result JSON to this path (implies --save-result --save-detailed)")
    p.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE", help="extra fields for the result JSON")
    p.add_argument("--label", default=None, help="a label for the result JSON")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--plot", default=None, help="write a PNG timeline: output tokens/s and inter-token latency, faults marked")


def check_bench_args(args: argparse.Namespace) -> list[Fault]:
    """Parse and check what argparse cannot; ValueError names the flag at fault."""
    faults = sorted((Fault.parse(f) for f in args.fault), key=lambda f: f.at_s)
    if args.request_rate <= 0 or args.burstiness <= 0 or args.num_prompts < 1 or (args.max_concurrency or 1) < 1:
        raise ValueError("--request-rate, --burstiness, --num-prompts and --max-concurrency must be positive")
    args.percentile_metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    if bad := [m for m in args.percentile_metrics if m not in METRICS]:
        raise ValueError(f"--percentile-metrics: unknown {', '.join(bad)} (known: {', '.join(METRICS)})")
    try:
        args.metric_percentiles = tuple(float(p) for p in args.metric_percentiles.split(","))
    except ValueError:
        raise ValueError(f"--metric-percentiles: {args.metric_percentiles!r} is not a list of numbers") from None
    if not all(0 < p < 100 for p in args.metric_percentiles):
        raise ValueError("--metric-percentiles must lie in (0, 100)")
    args.goodput_slos = parse_goodput(args.goodput or [])
    args.endpoint = args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")
    if args.metadata and any("=" not in kv for kv in args.metadata):
        raise ValueError("--metadata takes KEY=VALUE pairs")
    if args.result_file:
        args.save_result = args.save_detailed = True
    return faults




def result_path(args: argparse.Namespace, info: dict[str, Any]) -> Path:
    """--result-file, else --result-dir / (--result-filename or vLLM's default name)."""
    if args.result_file:
        return Path(args.result_file)
    rate = f"{args.request_rate:g}" if math.isfinite(args.request_rate) else "inf"
    name = args.result_filename or (f"{args.backend}-{rate}qps{f'-concurrency{args.max_concurrency}' if args.max_concurrency else ''}"
                                    f"-{info['id'].split('/')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return Path(args.result_dir or ".") / name



def cmd_bench(args: argparse.Namespace, serve_argv: list[str]) -> int:
    """Run the benchmark that `args` (add_bench_args' flags) describe, against `--base-url` (or
    --host/--port), else against a server started with `tarragon serve SERVE_ARGV`."""
    import httpx

    try:
        faults = check_bench_args(args)
    except ValueError as e:
        print(f"tarragon bench: error: {e}", file=sys.stderr)
        return 2
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    target = args.base_url or (f"http://{args.host or '127.0.0.1'}:{args.port or 8000}" if args.host or args.port else None)
    server = None
    try:
        server = None if target else Server(serve_argv, api_key=args.api_key)
        url = target.rstrip("/") if target else server.url
        info = server_info(url, args.api_key)
        if args.served_model_name:
            info["id"] = args.served_model_name
        timed = args.duration is not None and not math.isinf(args.request_rate)
        n = math.ceil(args.request_rate * args.duration) if timed else args.num_prompts  # --duration: as many as fit
        reqs = make_requests(args, info, n, url)
        run = asyncio.run(run_load(url, reqs, args.request_rate, args.burstiness, args.max_concurrency, faults, args.duration,
                                   args.api_key, args.seed, not args.disable_tqdm, args.endpoint, info["id"]))
    except (httpx.HTTPError, OSError) as e:
        print(f"tarragon bench: error: cannot reach the server at {target or 'the one started'}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, ValueError) as e:  # the server we started did not come up; a bad dataset
        print(f"tarragon bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()
    summary = summarize(run, args.metric_percentiles, args.goodput_slos or None)
    print(format_report(summary, metrics=args.percentile_metrics, percentiles=args.metric_percentiles))
    if args.save_result:
        path = result_path(args, info)
        write_json({**vllm_result(run, summary, args, info), "machine": machine(), "server": info, "summary": summary,
                    **({"requests": run_json(run, detail=True)["requests"]} if args.save_detailed else {})}, path)
        print(f"wrote {path}")
    if args.plot and plot_timelines([(f"{info['id']} (recovery: {info.get('recovery', 'unknown')})", run)], args.plot):
        print(f"wrote {args.plot}")
    return 0 if summary["successful_requests"] else 1


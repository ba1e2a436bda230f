"""The GPU check: parity, an expert-worker and an attention-worker failover, and throughput, on
one command (`bench/gpu_check.sh`, which calls this with --device cuda).

    python bench/gpu_check.py [--device cuda] [--size gpu] [--out result.json]

1. parity: the tiny model in fp32 on the device gives the same greedy tokens as on the CPU
   (which the test suite holds equal to transformers), and prompt logits within 1e-3;
2. a `--size` model (default `gpu`, ~1.9B parameters) in the device's dtype (bf16 on CUDA),
   2 attention workers x 3 expert workers on the device: output tokens/s at 1/16/64 requests;
3. under a 16-request load, SIGKILL of an expert worker, then of a busy attention worker a third
   of the way in: every request finishes with the failure-free run's tokens; stall = largest token gap minus the
   failure-free run's.
Prints a table and writes JSON. Works on CPU too (`--device cpu --size tiny`), which is how
it is checked without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tarragon import LLM, SamplingParams  # noqa: E402
from tarragon.faults import kill_under_load  # noqa: E402
from tarragon.make_model import make_model  # noqa: E402


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (8 + 4 * (i % 8),), generator=g).tolist() for i in range(n)]


def parity(device: str, workdir: Path) -> dict:
    model = make_model(workdir / "tiny", "mixtral", "tiny")
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, prompt_logits=True)
    outs = {}
    for dev in ("cpu", device):
        with LLM(model, attention_workers=1, expert_workers=2, device=dev, dtype="float32") as llm:
            outs[dev] = llm.generate(prompts(4, llm.model_config.vocab_size), params)
    same = [o.token_ids for o in outs["cpu"]] == [o.token_ids for o in outs[device]]
    diff = max((a.prompt_logits - b.prompt_logits).abs().max().item() for a, b in zip(outs["cpu"], outs[device]))
    return {"tokens_identical": same, "prompt_logits_max_abs_diff": diff, "ok": same and diff < 1e-3}


def throughput(llm: LLM, tokens: int) -> dict[int, float]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(4, llm.model_config.vocab_size, seed=1), params)  # warm-up
    result = {}
    for n in (1, 16, 64):
        t0 = time.monotonic()
        outs = llm.generate(prompts(n, llm.model_config.vocab_size, seed=2), params)
        result[n] = sum(len(o.token_ids) for o in outs) / (time.monotonic() - t0)
    return result


def failover(llm: LLM, role: str, tokens: int) -> dict:
    """Kill one worker of `role` a third of the way into a 16-request load."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    load = prompts(16, llm.model_config.vocab_size, seed=3)
    r = kill_under_load(llm, load, params, llm.generate(load, params), role)
    return dict(r, events=[f"+{1000 * (e.t - r['killed_at']):.0f} ms {e.kind} {e.worker} {e.detail}" for e in r["events"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="gpu", choices=["tiny", "bench", "gpu"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default="docs/results/gpu_check.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    report: dict = {"device": args.device, "card": card, "torch": torch.__version__, "model_size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        report["parity"] = parity(args.device, Path(tmp))
        print(f"parity ({card}, fp32 vs CPU): {report['parity']}  [{time.monotonic() - t0:.0f} s]", flush=True)
        t0 = time.monotonic()
        model = make_model(Path(tmp) / args.size, "mixtral", args.size)
        report["model_build_s"] = time.monotonic() - t0
        with LLM(model, attention_workers=2, expert_workers=3, device=args.device, kv_cache_bytes=4 << 30 if dev.type == "cuda" else 1 << 28) as llm:
            params = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) // 4
            report.update(params=params, dtype=llm.config.model.dtype, workers="2 AW x 3 EW")
            print(f"model: {args.size}, {params / 1e9:.2f}B parameters, {llm.config.model.dtype} [built in {report['model_build_s']:.0f} s]", flush=True)
            report["throughput_tok_s"] = throughput(llm, args.tokens)
            print(f"throughput: {report['throughput_tok_s']}", flush=True)
            report["expert_failover"] = failover(llm, "expert", args.tokens)
            print(f"expert failover: {report['expert_failover']}", flush=True)
            report["attention_failover"] = failover(llm, "attention", args.tokens)
            print(f"attention failover: {report['attention_failover']}", flush=True)
    ok = report["parity"]["ok"] and report["expert_failover"]["tokens_identical"] and report["attention_failover"]["tokens_identical"]
    report["ok"] = ok
    rows = [("card", card), ("model", f"{args.size}: {report['params'] / 1e9:.2f}B params, {report['dtype']}, 2 AW x 3 EW"),
            ("parity (fp32 vs CPU)", f"tokens identical: {report['parity']['tokens_identical']}, "
                                     f"max |d logit| {report['parity']['prompt_logits_max_abs_diff']:.1e}"),
            *((f"throughput @{n} requests", f"{v:.0f} tok/s") for n, v in report["throughput_tok_s"].items()),
            *((f"{r} failover", f"stall {report[f'{r}_failover']['stall_ms']:.0f} ms, tokens identical: "
                                f"{report[f'{r}_failover']['tokens_identical']}") for r in ("expert", "attention"))]
    print()
    for k, v in rows:
        print(f"{k:<26} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'PASS' if ok else 'FAIL'}; wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""The load client: streamed requests on an arrival schedule, faults fired on theirs, and a record
of when each streamed chunk arrived.

Everything here is timed on the client's clock (`time.monotonic()`); the server's clock is only
compared with itself (event minus fault), so the server may be on another host. Nothing is
summarised here: `report` turns a `BenchRun` into figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..faults import Fault
from .workload import BenchRequest, arrival_offsets


@dataclass
class RequestResult:
    ok: bool
    start: float  # client time.monotonic() when sent
    prompt_len: int
    output_len: int  # tokens received (the server's usage count)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with text
    end: float = 0.0
    error: str = ""
    text: str = ""


@dataclass
class FaultRecord:
    fault: Fault
    client_t: float  # client time.monotonic(), midway through the POST
    server_t: float = 0.0  # the server's time.monotonic() at the signal
    victim: str = ""
    error: str = ""


@dataclass
class BenchRun:
    start: float
    end: float
    requests: list[RequestResult]
    faults: list[FaultRecord]
    server: dict | None = None  # GET /tarragon/events after the run


def request_body(model: str, req: BenchRequest, chat: bool) -> dict[str, Any]:
    """What `vllm bench serve` sends (openai / openai-chat backends), greedy and ignoring EOS so
    that every request's length is exactly the one asked for."""
    common = {"model": model, "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        return {**common, "messages": [{"role": "user", "content": [{"type": "text", "text": req.prompt}]}],
                "max_completion_tokens": req.output_len}
    return {**common, "prompt": req.prompt, "max_tokens": req.output_len, "repetition_penalty": 1.0, "logprobs": None}


async def _stream_one(client, url: str, headers: dict, model: str, req: BenchRequest, chat: bool = False) -> RequestResult:
    """One streamed request; fewer tokens than asked for (or an error) counts as a failure."""
    body = request_body(model, req, chat)
    res = RequestResult(False, time.monotonic(), req.prompt_len, 0)
    finish = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.prompt_len = chunk["usage"]["prompt_tokens"]
                    res.output_len = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:
                        res.chunk_times.append(now)
                        res.text += piece
                    finish = choice.get("finish_reason") or finish
    except Exception as e:  # a dropped connection is a failed request, not a crashed benchmark
        res.error = f"{type(e).__name__}: {e}"
        return res
    finally:
        res.end = time.monotonic()
    if finish is None:
        res.error = "the stream ended without a finish reason"
    elif res.output_len != req.output_len:
        res.error = f"{res.output_len} tokens instead of {req.output_len}"
    res.ok = not res.error
    return res


async def _inject(client, base_url: str, headers: dict, fault: Fault, t0: float) -> FaultRecord:
    """Fire one fault on time. The server says when (its clock) and whom; the midpoint of the
    POST is the client's estimate of the moment."""
    await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
    sent = time.monotonic()
    rec = FaultRecord(fault, sent)
    try:
        r = await client.post(f"{base_url}/tarragon/fault", json={"role": fault.role, "index": fault.index, "action": fault.action},
                              headers=headers)
        rec.client_t = (sent + time.monotonic()) / 2
        if r.status_code == 200:
            rec.server_t, rec.victim = r.json()["t"], r.json()["victim"]
        else:
            rec.error = f"HTTP {r.status_code}: {r.text[:200]}"
    except Exception as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def run_load(base_url: str, requests: list[BenchRequest], rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, faults: list[Fault] = (), duration: float | None = None,
                   api_key: str | None = None, seed: int = 0, progress: bool = True, endpoint: str = "/v1/completions",
                   model: str | None = None) -> BenchRun:
    """Send `requests` at the given arrival rate (stopping new sends after `duration` seconds, if
    given), fire `faults` on schedule, and collect every stream's chunk arrival times."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
        model = model or (await client.get(f"{base_url}/v1/models", headers=headers)).json()["data"][0]["id"]
        chat = "chat" in endpoint
        gate = asyncio.Semaphore(max_concurrency or len(requests) or 1)
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)

        async def one(req: BenchRequest, at: float) -> RequestResult | None:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if duration is not None and time.monotonic() - t0 > duration:
                return None
            async with gate:
                res = await _stream_one(client, f"{base_url}{endpoint}", headers, model, req, chat)
            bar.update(1)
            return res

        t0 = time.monotonic()
        fault_tasks = [asyncio.create_task(_inject(client, base_url, headers, f, t0)) for f in faults]
        offsets = arrival_offsets(len(requests), rate, burstiness, seed)
        results = [r for r in await asyncio.gather(*(one(q, at) for q, at in zip(requests, offsets))) if r is not None]
        end = max((r.end for r in results), default=time.monotonic())
        records = list(await asyncio.gather(*fault_tasks))
        bar.close()
        server = None
        if faults:
            r = await client.get(f"{base_url}/tarragon/events", headers=headers)
            server = r.json() if r.status_code == 200 else None
    return BenchRun(t0, end, results, records, server)


"""The gateway: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an `LLM`.

Streams are fed by the driver, which holds every token a client has been sent, so a stream goes
on through worker failures without losing or repeating a token. `/health` says 200 only while
the cluster can serve; `/metrics` uses vLLM's metric names plus `tarragon:*` for resilience.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from typing import Annotated, Any, Literal

import msgspec
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .llm import LLM, Request
from .sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1, lt=2**31)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=2**31)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, lt=2**31)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None


class CompletionBody(_Sampling):
    prompt: str | list[Annotated[int, Field(ge=-(2**31), lt=2**31)]] | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class FaultBody(BaseModel):
    """POST /tarragon/fault: which live worker to hit, and how."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["expert", "attention"]
    index: int = Field(default=0, ge=0, description="the index-th live worker of that role, in registry order")
    action: Literal["kill", "hang"] = "kill"


class Metrics:
    def __init__(self, llm: LLM):
        self.llm = llm
        r = self.registry = CollectorRegistry()
        self.running = Gauge("vllm:num_requests_running", "Requests being generated", registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests not yet placed on a worker", registry=r)
        buckets = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", registry=r, buckets=buckets)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency", registry=r, buckets=buckets)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", registry=r, buckets=buckets)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("vllm:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.failures = Gauge("tarragon:failures_detected", "Worker failures detected, by role", ["role"], registry=r)
        self.stall = Histogram("tarragon:stall_seconds", "Per failure: the largest token gap it caused across streams",
                               registry=r, buckets=buckets)
        self.replayed = Gauge("tarragon:expert_calls_replayed", "Expert calls replayed to another worker", registry=r)
        self.restored = Gauge("tarragon:requests_restored", "Requests resumed from checkpointed KV", registry=r)
        self.recomputed = Gauge("tarragon:requests_recomputed", "Requests resumed by recomputing their KV", registry=r)
        self.rerun = Gauge("tarragon:requests_rerun", "Requests rerun from the prompt (restart policy)", registry=r)
        self.ckpt_bytes = Gauge("tarragon:checkpoint_bytes", "KV bytes held by the checkpoint store", registry=r)
        self.ckpt_dropped = Gauge("tarragon:checkpoint_writes_dropped", "KV writes lost before the store (lag, back-pressure)", registry=r)
        self.table_version = Gauge("tarragon:routing_table_version", "Version of the authoritative routing table", registry=r)
        self.workers_up = Gauge("tarragon:workers", "Workers by role and state", ["role", "state"], registry=r)
        self._stalls_seen = 0

    def finished(self, req: Request) -> None:
        t = req.times
        if t:
            self.ttft.observe(t[0] - req.submitted)
            for a, b in zip(t, t[1:]):
                self.itl.observe(b - a)
        self.e2e.observe(time.monotonic() - req.submitted)
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(len(req.tokens))
        self.success.labels(req.finish_reason or "abort").inc()

    def render(self) -> bytes:
        llm = self.llm
        with llm._lock:
            reqs = list(llm._requests.values())
        self.running.set(sum(1 for r in reqs if r.worker))
        self.waiting.set(sum(1 for r in reqs if not r.worker))
        for role, n in llm.failures.items():
            self.failures.labels(role).set(n)
        for s in llm.stalls[self._stalls_seen:]:
            self.stall.observe(s)
        self._stalls_seen = len(llm.stalls)
        self.replayed.set(llm.stats()["expert_calls_replayed"])
        self.restored.set(llm.reassigned["restored"])
        self.recomputed.set(llm.reassigned["recomputed"])
        self.rerun.set(llm.reassigned["rerun"])
        workers = llm.workers()
        store = [w for w in workers if w.role == "store" and w.state == "ready"]
        self.ckpt_bytes.set(store[0].info.get("bytes", 0) if store else 0)
        self.ckpt_dropped.set(sum(w.info.get("gaps", 0) for w in store))
        self.table_version.set(llm._state.table_version if llm._state else 0)
        self.workers_up.clear()
        for w in workers:
            self.workers_up.labels(w.role, w.state).inc()
        return generate_latest(self.registry)


def health(llm: LLM) -> tuple[bool, str]:
    state = llm._state
    if llm._closed or state is None or llm._orch.poll() is not None:
        return False, "the cluster is not running"
    if not llm._io.is_alive():
        return False, "the driver's I/O thread died"
    if not llm._live_attention():
        return False, "no attention worker is up"
    if state.unavailable_experts:
        return False, f"{state.unavailable_experts} experts have no live copy (waiting for a replacement)"
    return True, "ok"


def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_queue: int = 256,
               fault_injection: bool = False) -> FastAPI:
    app = FastAPI(title="Tarragon", version="0.1.0")
    metrics = Metrics(llm)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith(("/v1/", "/tarragon/")):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def _health():
        ok, reason = health(llm)
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def _metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def _models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "tarragon",
                                             "max_model_len": llm.max_model_len}]}

    @app.get("/v1/cluster")
    async def _cluster():
        state = llm._state
        return {
            "workers": [{"name": w.name, "role": w.role, "pid": w.pid, "state": w.state, "alive": w.alive, "rss_bytes": w.rss_bytes,
                         "replaces": w.replaces} for w in llm.workers()],
            "routing_table_version": state.table_version if state else 0,
            "shadows": llm.shadows,
            "recovery": llm.recovery,
            "vocab_size": llm.model_config.vocab_size,
            "events": [msgspec.structs.asdict(e) for e in llm.events()[-100:]],
        }

    def sampling(body: _Sampling) -> tuple[SamplingParams, list[str]]:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}", "not_found_error", "model")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        try:
            params = SamplingParams(max_tokens=body.max_tokens or body.max_completion_tokens or 16, temperature=body.temperature,
                                    top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop_token_ids=body.stop_token_ids,
                                    ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return params, stop

    def start(prompt: str | list[int], params: SamplingParams, add_special_tokens: bool = True) -> Request:
        with llm._lock:
            if len(llm._requests) >= max_queue:
                raise APIError(429, f"too many requests in flight (limit {max_queue}); retry later", "rate_limit_error")
        if isinstance(prompt, str):
            try:
                prompt = llm.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            except Exception as e:  # e.g. lone surrogates the tokenizer cannot take
                raise APIError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from None
        if isinstance(prompt, list) and prompt and len(prompt) + params.max_tokens > llm.max_model_len:
            params.max_tokens = max(1, llm.max_model_len - len(prompt))
        try:
            return llm.submit(prompt, params)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def run(body: _Sampling, prompt, kind: str):
        params, stop = sampling(body)
        req = start(prompt, params, add_special_tokens=kind == "text_completion")
        rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{req.req_id}"
        if body.stream:
            return StreamingResponse(stream(req, rid, kind, stop, body), media_type="text/event-stream")
        await until_done(req)
        text, reason = stopped_text(req, stop)
        if reason == "stop" and req.finish_reason != "stop":
            llm.abort(req)
        metrics.finished(req)
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.tokens),
                 "total_tokens": len(req.prompt_ids) + len(req.tokens)}
        choice = ({"index": 0, "text": text, "logprobs": None, "finish_reason": reason} if kind == "text_completion"
                  else {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason})
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice], "usage": usage}

    async def until_done(req: Request) -> None:
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        req.listener = lambda: loop.call_soon_threadsafe(wake.set)
        while not req.done.is_set():
            await wake.wait()
            wake.clear()

    def stopped_text(req: Request, stop: list[str]) -> tuple[str, str | None]:
        text = llm.tokenizer.decode(req.tokens)
        for s in stop:
            i = text.find(s)
            if i >= 0:
                return text[:i], "stop"
        return text, req.finish_reason if req.done.is_set() else None

    async def stream(req: Request, rid: str, kind: str, stop: list[str], body: _Sampling):
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        req.listener = lambda: loop.call_soon_threadsafe(wake.set)
        sent = ""  # text already streamed
        hold = max((len(s) for s in stop), default=1) - 1  # keep back what could start a stop string
        created = int(time.time())

        def chunk(delta: str, reason: str | None, first: bool = False) -> str:
            if kind == "text_completion":
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            else:
                d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            obj = {"id": rid, "object": "text_completion" if kind == "text_completion" else "chat.completion.chunk",
                   "created": created, "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(obj)}\n\n"

        finished = False
        try:
            if kind != "text_completion":
                yield chunk("", None, first=True)
            while True:
                done = req.done.is_set()
                text, reason = stopped_text(req, stop)
                if reason == "stop" and req.finish_reason != "stop":
                    llm.abort(req)  # a stop string: end generation now
                    done = True
                safe = text if done else text[: max(len(sent), len(text) - hold)]
                if safe.endswith("\ufffd") and not done:  # an incomplete UTF-8 sequence: wait for the rest
                    safe = safe[:-1]
                if len(safe) > len(sent):
                    yield chunk(safe[len(sent):], None)
                    sent = safe
                if done:
                    break
                await wake.wait()
                wake.clear()
            finished = True
            yield chunk("", reason or req.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.tokens),
                         "total_tokens": len(req.prompt_ids) + len(req.tokens)}
                yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk' if kind != 'text_completion' else 'text_completion', 'created': created, 'model': model_name, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished and not req.done.is_set():
                llm.abort(req)  # the client went away
            metrics.finished(req)

    @app.post("/v1/completions")
    async def _completions(body: CompletionBody):
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
            prompt = prompt[0]
        return await run(body, prompt, "text_completion")

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatBody):
        try:
            text = llm.tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages])
        except Exception as e:  # a template error is the request's fault
            raise APIError(400, f"chat template: {e}", param="messages") from None
        return await run(body, text, "chat.completion")

    if fault_injection:
        add_fault_injection(app, llm)
    return app


def add_fault_injection(app: FastAPI, llm: LLM) -> None:
    """Opt-in endpoints for `tarragon bench`: a real SIGKILL / SIGSTOP of a worker, and the event
    log with the driver's per-failure figures. Times are this host's time.monotonic()."""

    @app.post("/tarragon/fault")
    async def _fault(body: FaultBody):
        live = [w for w in llm.workers() if w.role == body.role and w.state == "ready" and w.alive]
        if body.index >= len(live):
            raise APIError(409, f"there are {len(live)} live {body.role} workers now; index {body.index} is out of range", param="index")
        victim = live[body.index]
        t = time.monotonic()
        llm.kill(victim.name, signal.SIGKILL if body.action == "kill" else signal.SIGSTOP)  # a hung worker is fenced by SIGKILL
        return {"victim": victim.name, "pid": victim.pid, "role": body.role, "action": body.action, "t": t}

    @app.get("/tarragon/events")
    async def _events():
        events = await asyncio.to_thread(llm.events)  # waits on the orchestrator: keep the streams flowing meanwhile
        return {
            "now": time.monotonic(),
            "recovery": llm.recovery,
            "events": [msgspec.structs.asdict(e) for e in events],
            "stalls_s": list(llm.stalls),
            "failures": dict(llm.failures),
            "reassigned": dict(llm.reassigned),
            "recomputed": list(llm.recomputed),
        }


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_queue: int = 256,
          fault_injection: bool = False) -> None:
    import uvicorn

    uvicorn.run(create_app(llm, model_name, api_key, max_queue, fault_injection), host=host, port=port, log_level="warning")

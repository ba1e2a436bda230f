"""The gateway: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an `LLM`.

Streams are fed by the driver, which holds every token a client has been sent, so a stream goes
on through worker failures without losing or repeating a token. `/health` says 200 only while
the cluster can serve; `/metrics` uses vLLM's metric names plus `tarragon:*` for resilience.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .faults import inject
from .llm import LLM, Request
from .vocabulary import FinishReason, Role, WorkerState
from .worker import freeze_heap
from .sampling import MAX_LOGPROBS, SamplingParams
from .tokenizer import PromptTooLong

log = logging.getLogger("tarragon.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


# Fields of OpenAI's and vLLM's schemas this server accepts but honours only at these values;
# any other value is a 400 that names the field.
ONLY_AT: dict[str, tuple] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
    "use_beam_search": (None, False), "length_penalty": (None, 1.0), "min_tokens": (None, 0), "prompt_logprobs": (None,),
    "allowed_token_ids": (None,), "bad_words": (None, []), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "truncate_prompt_tokens": (None,), "priority": (None, 0),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "structured_outputs": (None,), "tools": (None, []), "functions": (None, []),
    "function_call": (None, "none", "auto"), "tool_choice": (None, "none", "auto"), "chat_template": (None,),
    "continue_final_message": (None, False), "audio": (None,), "prediction": (None,), "modalities": (None, ["text"]),
    "prompt_embeds": (None,), "return_tokens_as_token_ids": (None, False), "documents": (None,),
    "return_token_ids": (None, False), "mm_processor_kwargs": (None, {}),
}
# Accepted and without effect here (bookkeeping, hints): no warning.
NO_EFFECT = {"user", "metadata", "store", "service_tier", "reasoning_effort", "request_id", "web_search_options",
             "cache_salt", "parallel_tool_calls", "safety_identifier", "prompt_cache_key", "verbosity", "kv_transfer_params",
             "vllm_xargs", "echo_prompt", "add_special_tokens", "stream_options"}


MAX_BODY_BYTES = 8 << 20  # whatever the context
MAX_STOP = 64  # stop strings, each at most MAX_STOP_CHARS; stop token ids at most MAX_STOP_IDS
MAX_STOP_CHARS = 1024
MAX_STOP_IDS = 4096
PROMPT_CHARS_PER_TOKEN = 64  # text longer than this many characters per context token cannot fit: refused before tokenizing


def body_limit(max_model_len: int) -> int:
    """The largest body a request that fits the context can need: its text at most
    PROMPT_CHARS_PER_TOKEN characters per token, each at most 6 bytes of JSON (\\uXXXX), at
    least 1 MiB, at most MAX_BODY_BYTES. Anything larger is a 413 before it is parsed: parsing
    holds the GIL (a 3 MB list of token ids: 60 ms), and with it every stream."""
    return min(MAX_BODY_BYTES, max(1 << 20, 6 * PROMPT_CHARS_PER_TOKEN * max_model_len))


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (nulls mean the default, as in vLLM).
    Other fields are checked against ONLY_AT / NO_EFFECT; unknown ones are ignored with a warning."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, lt=2**31)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=2**31)
    temperature: float | None = Field(default=None, ge=0.0, le=1e6)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, lt=2**31)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(default=None, max_length=MAX_STOP_IDS)
    include_stop_str_in_output: bool | None = False
    ignore_eos: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[Annotated[int, Field(ge=-(2**31), lt=2**31)]] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, lt=2**31)  # OpenAI's and vLLM's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool | None = True


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, ... go to the template as given
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """As vLLM's "string" content format: text parts joined by newlines; `developer` (OpenAI's
        new name for system) as `system`, which every chat template knows."""
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            bad = [p.type for p in self.content if p.type != "text" or p.text is None]
            if bad:
                raise APIError(400, f"content parts of type {bad[0]!r} are not supported (text only)", param="messages")
            msg["content"] = "\n".join(p.text for p in self.content)
        if self.role == "developer":
            msg["role"] = "system"
        return msg


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool | None = True
    add_special_tokens: bool | None = False  # the template writes them
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the template."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]]


class FaultBody(BaseModel):
    """POST /tarragon/fault: which live worker to hit, and how."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["expert", "attention"]
    index: int = Field(default=0, ge=0, description="the index-th live worker of that role, in registry order")
    action: Literal["kill", "hang"] = "kill"


class DrainBody(BaseModel):
    """POST /tarragon/drain: the worker to take out of service without a stall."""

    model_config = ConfigDict(extra="forbid")
    worker: str = Field(max_length=64, description="a ready attention or expert worker's name, as in /v1/cluster")


# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read ours unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                   960.0, 1920.0, 7680.0)
STALL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`, as vLLM's token-count histograms."""
    out = [m * 10**e for e in range(12) for m in (1, 2, 5)]
    return [b for b in out if b <= limit]


class Metrics:
    """vLLM's series, names and labels (`model_name`, `engine`), plus `tarragon:*` for resilience.
    The cluster's cumulative figures become counters by adding what is new at each scrape."""

    def __init__(self, llm: LLM, model_name: str):
        self.llm = llm
        r = self.registry = CollectorRegistry()
        lab = ("model_name", "engine")
        self.labels = (model_name, "0")

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, lab + extra, registry=r)

        def counter(name, doc, extra=()):
            return Counter(name, doc, lab + extra, registry=r)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, registry=r, buckets=buckets).labels(*self.labels)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(*self.labels)
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.").labels(*self.labels)
        self.success = counter("vllm:request_success", "Count of successfully processed requests.", ("finished_reason",))
        for reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT):
            self.success.labels(*self.labels, reason)
        counts = buckets_1_2_5(llm.max_model_len)
        self.req_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", counts)
        self.req_generation = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", counts)
        self.req_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", counts)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", TPOT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TPOT_BUCKETS)
        self.req_tpot = hist("vllm:request_time_per_output_token_seconds",
                             "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS)

        self.failures = counter("tarragon:failures_detected", "Worker failures detected, by role.", ("role",))
        self.stall = hist("tarragon:stall_seconds", "Per failure: the largest token gap it caused across streams.", STALL_BUCKETS)
        self.cumulative = {  # counter -> where its running total comes from
            counter("tarragon:expert_calls_replayed", "Expert calls replayed to another worker.").labels(*self.labels):
                lambda: llm.stats()["expert_calls_replayed"],
            counter("tarragon:requests_restored", "Requests resumed from checkpointed KV.").labels(*self.labels):
                lambda: llm.reassigned["restored"],
            counter("tarragon:requests_recomputed", "Requests resumed by recomputing their KV.").labels(*self.labels):
                lambda: llm.reassigned["recomputed"],
            counter("tarragon:requests_rerun", "Requests rerun from the prompt (restart policy).").labels(*self.labels):
                lambda: llm.reassigned["rerun"],
        }
        self.ckpt_dropped = counter("tarragon:checkpoint_writes_dropped", "KV writes lost before the store (lag, back-pressure).")
        self.ckpt_bytes = gauge("tarragon:checkpoint_bytes", "KV bytes held by the checkpoint stores (all copies).")
        self.table_version = gauge("tarragon:routing_table_version", "Version of the authoritative routing table.")
        self.workers_up = gauge("tarragon:workers", "Workers by role and state.", ("role", "state"))
        self._seen: dict = {}  # running totals already added to counters
        self._stalls_seen = 0

    def finished(self, req: Request) -> None:
        t = req.times
        if t:
            self.ttft.observe(t[0] - req.submitted)
            for a, b in zip(t, t[1:]):
                self.itl.observe(b - a)
                self.tpot.observe(b - a)
            if len(t) > 1:
                self.req_tpot.observe((t[-1] - t[0]) / (len(t) - 1))
                self.decode.observe(t[-1] - t[0])
        self.e2e.observe(time.monotonic() - req.submitted)
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(len(req.tokens))
        self.req_prompt.observe(len(req.prompt_ids))
        self.req_generation.observe(len(req.tokens))
        self.req_max_tokens.observe(req.params.max_tokens)
        self.success.labels(*self.labels, req.finish_reason or FinishReason.ABORT).inc()

    def _add_new(self, counter, total: float) -> None:
        """Counters only go up: add what the running total gained since the last scrape."""
        seen = self._seen.get(counter, 0)
        if total > seen:
            counter.inc(total - seen)
        self._seen[counter] = total  # lower: a new source (e.g. a replaced store) counting from 0

    def render(self) -> bytes:
        llm = self.llm
        reqs = llm.in_flight()
        self.running.labels(*self.labels).set(sum(1 for r in reqs if r.worker))
        self.waiting.labels(*self.labels).set(sum(1 for r in reqs if not r.worker))
        for role, n in list(llm.failures.items()):
            self._add_new(self.failures.labels(*self.labels, role), n)
        for s in llm.stalls[self._stalls_seen:]:
            self.stall.observe(s)
        self._stalls_seen = len(llm.stalls)
        for counter, total in self.cumulative.items():
            self._add_new(counter, total())
        workers = llm.workers()
        aws = [w for w in workers if w.role == Role.ATTENTION and w.state == WorkerState.READY and w.kv_blocks_total]
        self.kv_usage.labels(*self.labels).set(sum(w.kv_blocks_used for w in aws) / max(1, sum(w.kv_blocks_total for w in aws)))
        store = [w for w in workers if w.role == Role.STORE and w.state == WorkerState.READY]
        self.ckpt_bytes.labels(*self.labels).set(sum(w.info.get("bytes", 0) for w in store))
        self._add_new(self.ckpt_dropped.labels(*self.labels), sum(w.info.get("gaps", 0) for w in store))
        self.table_version.labels(*self.labels).set(llm.table_version)
        self.workers_up.clear()
        for w in workers:
            self.workers_up.labels(*self.labels, w.role, w.state).inc()
        return generate_latest(self.registry)


def check_fields(body: BaseModel) -> None:
    """400 for a field this server cannot honour at the value given; a warning for unknown ones."""
    extra = body.model_extra or {}
    for k, v in extra.items():
        if k in ONLY_AT and v not in ONLY_AT[k]:
            raise APIError(400, f"{k}={json.dumps(v)[:60]} is not supported by this server "
                                f"(accepted only as {json.dumps(ONLY_AT[k][-1])})", param=k)
    fmt = getattr(body, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        raise APIError(400, f"response_format {fmt.get('type')!r} is not supported (only 'text')", param="response_format")
    unknown = [k for k in extra if k not in ONLY_AT and k not in NO_EFFECT]
    if unknown:
        log.warning("ignoring unknown request fields: %s", ", ".join(repr(k[:40]) for k in unknown[:10]))


def context_error(max_model_len: int, prompt_len: int, max_tokens: int | None) -> APIError:
    """vLLM's wording, which clients and their users recognise."""
    if max_tokens is None:
        return APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                             f"{prompt_len} input tokens. Please reduce the length of the input messages.", param="messages")
    return APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                         f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                         "Please reduce the length of the messages or completion.", param="max_tokens")


def sampling_params(body: _Sampling, chat: bool, prompt_len: int, max_model_len: int) -> SamplingParams:
    """The request's SamplingParams; without max_tokens, chat may use the rest of the context."""
    if prompt_len >= max_model_len:
        raise context_error(max_model_len, prompt_len, None)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    elif prompt_len + max_tokens > max_model_len:
        raise context_error(max_model_len, prompt_len, max_tokens)
    logprobs = (body.top_logprobs or 0 if body.logprobs else None) if chat else body.logprobs
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=_or(body.temperature, 1.0), top_p=_or(body.top_p, 1.0), top_k=_or(body.top_k, -1),
            min_p=_or(body.min_p, 0.0), seed=body.seed, repetition_penalty=_or(body.repetition_penalty, 1.0),
            presence_penalty=_or(body.presence_penalty, 0.0), frequency_penalty=_or(body.frequency_penalty, 0.0),
            logprobs=logprobs, stop=stop, include_stop_str_in_output=bool(body.include_stop_str_in_output),
            stop_token_ids=body.stop_token_ids, ignore_eos=bool(body.ignore_eos))
    except ValueError as e:
        raise APIError(400, str(e), param="stop" if "stop" in str(e) else None) from None


def _or(value, default):
    return default if value is None else value


class Serving:
    """Completions and chat completions on one LLM: request to SamplingParams, then the response
    as one JSON body or as a stream of chunks (the text of each read from the request's
    incremental detokenizer)."""

    def __init__(self, llm: LLM, model_name: str, metrics: Metrics, max_queue: int):
        self.llm, self.model_name, self.metrics, self.max_queue = llm, model_name, metrics, max_queue
        self._tok_str = functools.lru_cache(maxsize=65536)(lambda i: llm.tokenizer.tok.decode([i], skip_special_tokens=False))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}", "not_found_error", "model")

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True, kwargs: dict | None = None) -> str:
        try:
            return self.llm.tokenizer.apply_chat_template([m.for_template() for m in messages], add_generation_prompt, **(kwargs or {}))
        except APIError:
            raise
        except Exception as e:  # a template error is the request's fault
            raise APIError(400, f"chat template: {e}", param="messages") from None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        limit = PROMPT_CHARS_PER_TOKEN * self.llm.max_model_len
        if len(text) > limit:  # far beyond the context whatever the tokenizer: not worth tokenizing
            raise APIError(400, f"the prompt has {len(text)} characters; this model's context ({self.llm.max_model_len} tokens) "
                                f"cannot hold that many", param="prompt")
        try:
            return self.llm.tokenizer.encode(text, add_special_tokens=add_special_tokens, max_tokens=self.llm.max_model_len)
        except PromptTooLong as e:
            raise context_error(self.llm.max_model_len, e.tokens, None) from None
        except Exception as e:  # e.g. lone surrogates the tokenizer cannot take
            raise APIError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from None

    def completion_ids(self, body: CompletionBody) -> list[int]:
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
            prompt = prompt[0]
        return self.encode(prompt, body.add_special_tokens is not False) if isinstance(prompt, str) else list(prompt)

    def chat_ids(self, body: ChatBody) -> list[int]:
        text = self.render(body.messages, body.add_generation_prompt is not False, body.chat_template_kwargs)
        return self.encode(text, bool(body.add_special_tokens))

    async def handle(self, body: _Sampling, chat: bool, http: HTTPRequest):
        self.check_model(body.model)
        check_fields(body)
        ids = await asyncio.to_thread(self.chat_ids if chat else self.completion_ids, body)  # off the event loop
        params = sampling_params(body, chat, len(ids), self.llm.max_model_len)
        ok, why = self.llm.accepting()
        if not ok:
            raise APIError(503, f"the cluster cannot serve now: {why}", "service_unavailable")
        if self.llm.queue_depth >= self.max_queue:
            raise APIError(429, f"too many requests in flight (limit {self.max_queue}); retry later", "rate_limit_error")
        try:
            req = self.llm.submit(ids, params)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{req.req_id}"
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.stream(req, rid, chat, usage), media_type="text/event-stream")
        return await self.complete(req, rid, chat, http)

    async def _updates(self, req: Request):
        """Yields (done, tokens counted) at every new token until the request ends."""
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        req.listener = lambda: loop.call_soon_threadsafe(wake.set)
        while True:
            done = req.done.is_set()  # read before decoding: every token up to the end is in then
            n = self.llm.advance(req)
            done = done or isinstance(req.stop_reason, str)
            yield done, n
            if done:
                return
            await wake.wait()
            wake.clear()

    async def complete(self, req: Request, rid: str, chat: bool, http: HTTPRequest) -> dict:
        n = 0
        try:
            async for done, n in self._updates(req):
                if not done and await http.is_disconnected():
                    break
        finally:
            if not req.done.is_set():
                self.llm.abort(req)  # the client went away
            self.metrics.finished(req)
        if req.finish_reason == FinishReason.ERROR:
            raise APIError(503, f"the cluster could not serve this request: {req.error}", "service_unavailable")
        text, lps = req.detok.text, self.logprobs(req, 0, n, chat)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps}
        else:
            choice = {"index": 0, "text": text, "logprobs": lps}
        choice |= {"finish_reason": req.finish_reason, "stop_reason": req.stop_reason}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": self.usage(req, n)}

    def usage(self, req: Request, n: int) -> dict:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n, "total_tokens": len(req.prompt_ids) + n}

    async def stream(self, req: Request, rid: str, chat: bool, include_usage: bool):
        created = int(time.time())
        obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": self.model_name}

        def chunk(delta: str, lps, reason: str | None = None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": delta} if first else {"content": delta}
                choice = {"index": 0, "delta": d, "logprobs": lps, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta, "logprobs": lps, "finish_reason": reason}
            if reason is not None:
                choice["stop_reason"] = req.stop_reason
            return f"data: {json.dumps({**obj, 'choices': [choice]})}\n\n"

        sent = tok_sent = n = 0  # characters and tokens already sent
        finished = False
        try:
            if chat:
                yield chunk("", None, first=True)
            async for done, n in self._updates(req):
                upto = req.detok.releasable(done)
                failed = done and req.finish_reason == FinishReason.ERROR
                if upto > sent or (done and not failed):  # the last token's chunk carries the finish reason
                    lps = self.logprobs(req, tok_sent, n, chat, sent)
                    yield chunk(req.detok.text[sent:upto], lps, req.finish_reason if done and not failed else None)
                    sent, tok_sent = upto, n
            finished = True
            if req.finish_reason == FinishReason.ERROR:  # the cluster could not serve it: say so, then end
                err = {"message": f"the cluster could not serve this request: {req.error}", "type": "service_unavailable",
                       "param": None, "code": 503}
                yield f"data: {json.dumps({'error': err})}\n\n"
                yield "data: [DONE]\n\n"
                return
            if include_usage:
                yield f"data: {json.dumps({**obj, 'choices': [], 'usage': self.usage(req, n)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished and not req.done.is_set():
                self.llm.abort(req)  # the client went away
            self.metrics.finished(req)

    def logprobs(self, req: Request, start: int, end: int, chat: bool, offset: int = 0) -> dict | None:
        """OpenAI's logprobs object for output tokens [start, end)."""
        if req.params.logprobs is None:
            return None
        lps = [lp for lp in req.logprobs[start:end] if lp is not None]
        s = self._tok_str
        if chat:
            return {"content": [{"token": s(lp.ids[0]), "logprob": lp.logprobs[0], "bytes": list(s(lp.ids[0]).encode()),
                                 "top_logprobs": [{"token": s(i), "logprob": v, "bytes": list(s(i).encode())}
                                                  for i, v in zip(lp.ids[1:], lp.logprobs[1:])]} for lp in lps]}
        offsets = []
        for lp in lps:
            offsets.append(offset)
            offset += len(s(lp.ids[0]))
        return {"tokens": [s(lp.ids[0]) for lp in lps], "token_logprobs": [lp.logprobs[0] for lp in lps],
                "top_logprobs": [{s(i): v for i, v in zip(lp.ids, lp.logprobs)} for lp in lps], "text_offset": offsets}

    def tokenize(self, body: TokenizeBody) -> dict:
        self.check_model(body.model)
        if body.messages:
            ids = self.encode(self.render(body.messages, body.add_generation_prompt is not False), bool(body.add_special_tokens))
        elif body.prompt is not None:
            ids = self.encode(body.prompt, body.add_special_tokens is not False)
        else:
            raise APIError(400, "give a prompt or messages", param="prompt")
        return {"count": len(ids), "max_model_len": self.llm.max_model_len, "tokens": ids, "token_strs": None}

    def detokenize(self, body: DetokenizeBody) -> dict:
        self.check_model(body.model)
        vocab = self.llm.model_config.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
        return {"prompt": self.llm.tokenizer.decode(body.tokens)}


def health(llm: LLM) -> tuple[bool, str]:
    return llm.health()


class BodyLimit:
    """413 for a request body over `max_bytes`: at once from Content-Length; a chunked body (no
    length given) is read here first, up to the limit, and handed on."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body is over {self.max_bytes} bytes", param="body")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the server holds the body to this length
            if not length.isdigit() or int(length) > self.max_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@dataclass
class AppState:
    """What the handlers serve from (kept on `app.state.tarragon`)."""

    llm: LLM
    model_name: str
    metrics: Metrics
    serving: Serving
    api_key: str | None
    created: int = field(default_factory=lambda: int(time.time()))


def app_state(request: HTTPRequest) -> AppState:
    return request.app.state.tarragon


# ---- errors and authentication --------------------------------------------------------------------

async def on_api_error(_, e: APIError):
    return error_response(e.status, e.message, e.type, e.param)


async def on_validation_error(_, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return error_response(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc or None)


async def on_http_error(_, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")


async def on_internal_error(_, e: Exception):
    return error_response(500, f"internal error: {type(e).__name__}", "internal_error")


EXCEPTION_HANDLERS = ((APIError, on_api_error), (RequestValidationError, on_validation_error),
                      (StarletteHTTPException, on_http_error), (Exception, on_internal_error))


async def check_api_key(request: HTTPRequest, call_next):
    api_key = app_state(request).api_key
    if api_key and request.url.path.startswith(("/v1/", "/tarragon/", "/tokenize", "/detokenize")):
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return error_response(401, "invalid or missing API key", "authentication_error")
    return await call_next(request)


# ---- the cluster ------------------------------------------------------------------------------------

async def get_health(request: HTTPRequest):
    ok, reason = health(app_state(request).llm)
    return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason}, status_code=200 if ok else 503)


async def get_metrics(request: HTTPRequest):
    return PlainTextResponse(app_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def get_models(request: HTTPRequest):
    st = app_state(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created, "owned_by": "tarragon",
                                         "max_model_len": st.llm.max_model_len}]}


async def get_cluster(request: HTTPRequest):
    llm = app_state(request).llm
    return {
        "workers": [{"name": w.name, "role": w.role, "pid": w.pid, "state": w.state, "alive": w.alive, "rss_bytes": w.rss_bytes,
                     "replaces": w.replaces} for w in llm.workers()],
        "routing_table_version": llm.table_version,
        "shadows": llm.shadows,
        "recovery": llm.recovery,
        "vocab_size": llm.model_config.vocab_size,
        "events": [msgspec.structs.asdict(e) for e in await cluster_events(llm)],
    }


async def cluster_events(llm: LLM) -> list:
    try:  # off the event loop, and briefly: a hung orchestrator must not stall the streams
        return (await asyncio.to_thread(llm.events, 1.0))[-100:]
    except TimeoutError:
        return []


# ---- the OpenAI API and vLLM's additions (/version, /tokenize, /detokenize) ---------------------------

async def get_version():
    return {"version": __version__}


async def post_tokenize(body: TokenizeBody, request: HTTPRequest):
    return await asyncio.to_thread(app_state(request).serving.tokenize, body)


async def post_detokenize(body: DetokenizeBody, request: HTTPRequest):
    return await asyncio.to_thread(app_state(request).serving.detokenize, body)


async def post_completions(body: CompletionBody, request: HTTPRequest):
    return await app_state(request).serving.handle(body, False, request)


async def post_chat(body: ChatBody, request: HTTPRequest):
    return await app_state(request).serving.handle(body, True, request)


# ---- opt-in: operators (/tarragon/drain) and `tarragon bench` (/tarragon/fault, /tarragon/events) ------

async def post_drain(body: DrainBody, request: HTTPRequest):
    """Take a worker out of service without a stall."""
    try:
        app_state(request).llm.drain(body.worker)
    except ValueError as e:
        raise APIError(409, str(e), param="worker") from None
    return {"worker": body.worker, "draining": True}


async def post_fault(body: FaultBody, request: HTTPRequest):
    """A real SIGKILL / SIGSTOP of a worker. Times are this host's time.monotonic()."""
    try:
        victim, t = inject(app_state(request).llm, body.role, body.index, body.action)
    except IndexError as e:
        raise APIError(409, str(e), param="index") from None
    return {"victim": victim.name, "pid": victim.pid, "role": body.role, "action": body.action, "t": t}


async def get_events(request: HTTPRequest):
    """The event log with the driver's per-failure figures."""
    llm = app_state(request).llm
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


ROUTES = [("GET", "/health", get_health), ("GET", "/metrics", get_metrics), ("GET", "/v1/models", get_models),
          ("GET", "/v1/cluster", get_cluster), ("GET", "/version", get_version), ("POST", "/tokenize", post_tokenize),
          ("POST", "/detokenize", post_detokenize), ("POST", "/v1/completions", post_completions),
          ("POST", "/v1/chat/completions", post_chat)]
ADMIN_ROUTES = [("POST", "/tarragon/drain", post_drain)]  # behind the API key, like every /tarragon/ path
FAULT_ROUTES = [("POST", "/tarragon/fault", post_fault), ("GET", "/tarragon/events", get_events)]


def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_queue: int = 256,
               fault_injection: bool = False, max_body_bytes: int | None = None, admin: bool = False) -> FastAPI:
    # No /docs, /redoc, /openapi.json: nothing is served that the API key does not cover.
    app = FastAPI(title="Tarragon", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or body_limit(llm.max_model_len))
    metrics = Metrics(llm, model_name)
    app.state.tarragon = AppState(llm, model_name, metrics, Serving(llm, model_name, metrics, max_queue), api_key)
    for exc, handler in EXCEPTION_HANDLERS:
        app.add_exception_handler(exc, handler)
    app.middleware("http")(check_api_key)
    for method, path, endpoint in ROUTES + (FAULT_ROUTES if fault_injection else []) + (ADMIN_ROUTES if admin else []):
        app.add_api_route(path, endpoint, methods=[method])
    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any worker starts: a busy port is a clear error at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def watch_cluster(llm: LLM, server, failed: threading.Event, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Log each orchestrator event (failure, reroute, restore, replacement) as one line, and stop
    the server (failed) once the cluster can no longer serve at all: the driver's I/O thread is
    gone. A dead orchestrator is not that: the driver starts its successor."""
    events = logging.getLogger("tarragon.events")
    seen = 0.0  # the time of the last event logged
    while not stop.wait(interval_s):
        if not llm.alive:
            logging.getLogger("tarragon.server").error("the cluster cannot serve any more (the driver's I/O thread died); stopping")
            failed.set()
            server.should_exit = True
            return
        try:
            log_ = llm.events(timeout=2.0)
        except Exception:  # the orchestrator is busy or going: try again next round
            continue
        for e in log_:
            if e.t > seen:  # by time: a successor orchestrator's log starts empty
                events.info("%s%s%s%s", e.kind, f" {e.worker}" if e.worker else "", f": {e.detail}" if e.detail else "",
                            f" ({e.ms:.1f} ms)" if e.ms else "")
        seen = max([seen] + [e.t for e in log_])


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_queue: int = 256,
          fault_injection: bool = False, sock: socket.socket | None = None, admin: bool = False) -> int:
    """Run the HTTP server until a signal (returns 0) or until the cluster cannot serve (1)."""
    import uvicorn

    app = create_app(llm, model_name, api_key, max_queue, fault_injection, admin=admin)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=True, timeout_graceful_shutdown=5))
    failed, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=watch_cluster, args=(llm, server, failed, stop), name="tarragon-watch", daemon=True)
    watcher.start()
    # uvicorn, once it has shut down for a SIGTERM (a service manager's stop), raises it again for
    # the handler it found: under the default one the process died there, before the caller shut
    # the cluster down and removed its run folder (with the cluster key). This one lets it return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if threading.current_thread() is threading.main_thread() else None
    freeze_heap()  # (a collection of the start-up heap would stall every stream for tens of ms)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        stop.set()
        watcher.join(5)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 1 if failed.is_set() else 0

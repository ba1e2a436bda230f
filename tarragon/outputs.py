"""Request output processing: the driver's record of each request (`Request`, everything its
client has been sent), and what a caller gets back (`RequestOutput`). `LLM.generate` and the
server both read a request's text through `advance`, so stop strings and incremental
detokenizing behave the same in both."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, TokenLogprobs
from .tokenizer import Detokenizer
from .vocabulary import FinishReason


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    token_times: list[float]  # time.monotonic() at which each token reached the driver
    prompt_logits: torch.Tensor | None = None  # [len(prompt), vocab] fp32, when asked for
    logprobs: list[TokenLogprobs] | None = None  # per output token, when SamplingParams.logprobs is set
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None: EOS or length)
    error: str | None = None  # why it ended early (finish_reason "error"): the cluster could not serve it


@dataclass
class Request:
    """The driver's record of one request: everything the client has been sent."""

    req_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    worker: str
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_logits: torch.Tensor | None = None
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per token, when asked for
    stop_reason: str | int | None = None
    detok: Detokenizer | None = None  # its text, decoded as tokens arrive (see `advance`)
    done: threading.Event = field(default_factory=threading.Event)
    skip: int = 0  # tokens to drop: a rerun from the prompt regenerates what the client has
    submitted: float = field(default_factory=time.monotonic)
    error: str | None = None  # set with finish_reason "error"
    listener: Callable[[], None] | None = None  # called (on the I/O thread) at each token and at the end

    @property
    def seq(self) -> int:
        """Submission order (ids are "req-N")."""
        return int(self.req_id.split("-")[1])


def advance(req: Request, abort: Callable[[Request], None]) -> int:
    """Decode the request's new tokens (each once); a stop string ends the request here (`abort`
    tells the cluster). Returns how many of its tokens count as output (those up to the stop string)."""
    n = len(req.tokens)  # the I/O thread appends meanwhile: read up to here, without a copy
    if req.detok.update(req.tokens, n):
        if req.stop_reason is None:
            req.stop_reason = req.detok.stop_reason
            if not req.done.is_set():
                abort(req)
            req.finish_reason = FinishReason.STOP
    elif req.done.is_set() and req.finish_reason == FinishReason.STOP and n and req.tokens[n - 1] in (req.params.stop_token_ids or ()):
        req.stop_reason = req.tokens[n - 1]
    return req.detok.consumed if isinstance(req.stop_reason, str) else n


def output(req: Request, n: int) -> RequestOutput:
    """What `LLM.wait` returns: the first `n` tokens (those `advance` counted)."""
    return RequestOutput(
        req.req_id, req.prompt, req.prompt_ids, req.tokens[:n], req.detok.text, req.finish_reason, req.times[:n],
        req.prompt_logits, req.logprobs[:n] if req.params.logprobs is not None else None, req.stop_reason, req.error,
    )

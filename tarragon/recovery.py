"""Recovery policy: where a request goes (new, or orphaned by a failed or drained attention
worker), and how an orphan resumes there, one function per `RecoveryPolicy`.

The driver holds every token a client has been sent, so any attention worker can take a request
over; the policies differ in how the new worker rebuilds its KV cache (paper §5 and baselines).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from . import protocol as P
from .outputs import Request
from .sampling import SamplingParams
from .vocabulary import RecoveryPolicy


def place(loads: dict[str, int], placement: str, max_num_seqs: int) -> str:
    """The attention worker for a request ("": none is up). `spread`: the least loaded. `pack`:
    the first with room for a whole batch, so that, when workers share cores, requests batch on
    one (a step's cost barely grows with its batch) and the others stand by: they hold no
    requests, cost memory, not compute, and take a failed worker's requests at once."""
    if not loads:
        return ""
    if placement == "pack":
        room = [n for n in sorted(loads) if loads[n] < max_num_seqs]
        if room:
            return room[0]
    return min(loads, key=lambda n: (loads[n], n))


def assign(orphans: list[Request], loads: dict[str, int], placement: str, max_num_seqs: int) -> list[tuple[Request, str]]:
    """Each orphan's new worker, placed as a new request would be, in submission order."""
    loads, out = dict(loads), []
    for req in sorted(orphans, key=lambda r: r.seq):
        worker = place(loads, placement, max_num_seqs)
        loads[worker] += 1
        out.append((req, worker))
    return out


# How an orphan resumes: the message for its new worker, and what that costs ("restored" from
# the store, "recomputed", or "rerun" from the prompt).
Resume = Callable[[Request, SamplingParams, bool], tuple[P.Msg, str]]


def resume_tarragon(req: Request, params: SamplingParams, store_ok: bool) -> tuple[P.Msg, str]:
    """The checkpointed KV from a store, only the uncommitted tail recomputed (no store: recompute)."""
    if not store_ok:
        return resume_recompute(req, params, store_ok)
    return P.ResumeRequest(req.req_id, req.prompt_ids, list(req.tokens), params, True, False), "restored"


def resume_recompute(req: Request, params: SamplingParams, store_ok: bool) -> tuple[P.Msg, str]:
    """Prompt and output so far prefilled again in one step (request migration)."""
    return P.ResumeRequest(req.req_id, req.prompt_ids, list(req.tokens), params, False, False), "recomputed"


def resume_replay(req: Request, params: SamplingParams, store_ok: bool) -> tuple[P.Msg, str]:
    """Prompt and output recomputed one token per step (a naive baseline)."""
    return P.ResumeRequest(req.req_id, req.prompt_ids, list(req.tokens), params, False, True), "recomputed"


def resume_restart(req: Request, params: SamplingParams, store_ok: bool) -> tuple[P.Msg, str]:
    """After a restart of every worker: from the prompt, as if new (the tokens the client has are
    skipped as they come again). A drain moves requests without a restart: recomputed then."""
    if req.skip:
        return P.AddRequest(req.req_id, req.prompt_ids, params), "rerun"
    return resume_recompute(req, params, store_ok)


RESUME: dict[RecoveryPolicy, Resume] = {
    RecoveryPolicy.TARRAGON: resume_tarragon,
    RecoveryPolicy.RECOMPUTE: resume_recompute,
    RecoveryPolicy.REPLAY: resume_replay,
    RecoveryPolicy.RESTART: resume_restart,
}


def resume(policy: RecoveryPolicy, req: Request, store_ok: bool) -> tuple[P.Msg, str]:
    """The message that resumes `req` on another worker under `policy`, and its cost."""
    params = msgspec.structs.replace(req.params, prompt_logits=False)
    return RESUME[policy](req, params, store_ok)

"""The words processes exchange, each vocabulary in one place.

They are `StrEnum`s: a member is equal to its string, so logs, JSON and the event log read as
before, and msgspec rejects a message carrying a word outside the vocabulary on receipt.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What a worker process does: one failure domain each."""

    ATTENTION = "attention"  # stateful: KV cache, scheduler, sampling
    EXPERT = "expert"  # stateless: expert FFNs (and shadows of other workers' experts)
    STORE = "store"  # checkpoint store: attention workers' KV, for restores
    ORCHESTRATOR = "orchestrator"  # failure detection, routing tables, replacements (not a worker)


class WorkerState(StrEnum):
    """The orchestrator's view of a worker."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # planned exit: finishing or handing back its work
    FAILED = "failed"  # fenced: never heard again
    STOPPED = "stopped"  # drained and exited, or shut down


class FinishReason(StrEnum):
    """Why a request ended (OpenAI's `finish_reason`, plus ours)."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or asked
    ERROR = "error"  # the cluster could not finish it (no token for stall_timeout_s, ...)


class RecoveryPolicy(StrEnum):
    """What happens to an attention worker's requests when it dies (the paper's baselines too)."""

    TARRAGON = "tarragon"  # resume elsewhere from the checkpoint store's KV, recompute only the tail
    RECOMPUTE = "recompute"  # resume elsewhere, recompute the whole prefix in one prefill
    REPLAY = "replay"  # resume elsewhere, recompute one token per step (a naive baseline)
    RESTART = "restart"  # restart every worker and rerun every request (what engines do today)


class EventKind(StrEnum):
    """Entries of the orchestrator's event log (what `tarragon bench` reports per fault)."""

    WORKER_FAILED = "worker_failed"
    ROUTING_UPDATED = "routing_updated"
    REPLACEMENT_STARTED = "replacement_started"
    REPLACEMENT_READY = "replacement_ready"
    RESTART_STARTED = "restart_started"
    RESTART_READY = "restart_ready"
    ORCHESTRATOR_REPLACED = "orchestrator_replaced"
    DRAIN_STARTED = "drain_started"
    DRAIN_REFUSED = "drain_refused"
    DRAIN_FORCED = "drain_forced"
    WORKER_DRAINED = "worker_drained"
    # reported by attention workers
    DRAINED = "drained"
    RESTORED = "restored"  # restored_tokens of request_tokens came from a store
    RESTORE_REJECTED = "restore_rejected"
    RESTORE_TIMEOUT = "restore_timeout"
    STORE_REFILLED = "store_refilled"
    STORE_REFILL_DROPPED = "store_refill_dropped"
    # reported by the driver
    REQUESTS_REASSIGNED = "requests_reassigned"
    STALL = "stall"

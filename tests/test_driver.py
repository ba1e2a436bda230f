"""The driver's parts in-process, no cluster: placement and each recovery policy's resume, the
configuration tree's resolution (and the worker spec as a view of it, across the wire), and
stop strings in the output processor."""

from __future__ import annotations

import os

import msgspec
import pytest

from tarragon import protocol as P
from tarragon.engine_args import EngineArgs
from tarragon.outputs import Request, advance, output
from tarragon.recovery import assign, place, resume
from tarragon.sampling import SamplingParams
from tarragon.tokenizer import Detokenizer, Tokenizer
from tarragon.vocabulary import FinishReason, RecoveryPolicy
from tarragon.worker import WorkerSpec


def request(i: int, tokens: int = 0, skip: int = 0, stop: list[str] | None = None, tokenizer=None) -> Request:
    params = SamplingParams(max_tokens=50, temperature=0.0, stop=stop or [])
    req = Request(f"req-{i}", None, [5, 6, 7], params, "aw-dead", tokens=list(range(10, 10 + tokens)), skip=skip)
    if tokenizer is not None:
        req.detok = Detokenizer(tokenizer, params.stop)
    return req


def test_one_placement_rule_for_new_and_orphaned_requests():
    assert place({}, "spread", 4) == ""
    assert place({"aw0": 3, "aw1": 1}, "spread", 4) == "aw1"
    assert place({"aw0": 3, "aw1": 1}, "pack", 4) == "aw0"  # room for a batch: requests batch on one
    assert place({"aw0": 4, "aw1": 1}, "pack", 4) == "aw1"  # full: the least loaded
    # Orphans go as new requests would, in submission order, each counted as it is placed.
    plan = assign([request(7), request(2), request(5)], {"aw0": 1, "aw1": 0}, "spread", 64)
    assert [(r.req_id, w) for r, w in plan] == [("req-2", "aw1"), ("req-5", "aw0"), ("req-7", "aw1")]
    plan = assign([request(1), request(0)], {"aw0": 0, "aw1": 0}, "pack", 64)
    assert [w for _, w in plan] == ["aw0", "aw0"]


def test_each_recovery_policy_resumes_its_way():
    req = request(0, tokens=4)
    msg, how = resume(RecoveryPolicy.TARRAGON, req, store_ok=True)
    assert isinstance(msg, P.ResumeRequest) and msg.restore and not msg.tokenwise and how == "restored"
    assert msg.output == req.tokens and not msg.params.prompt_logits
    msg, how = resume(RecoveryPolicy.TARRAGON, req, store_ok=False)  # no store up: recompute
    assert isinstance(msg, P.ResumeRequest) and not msg.restore and how == "recomputed"
    msg, how = resume(RecoveryPolicy.RECOMPUTE, req, store_ok=True)
    assert not msg.restore and not msg.tokenwise and how == "recomputed"
    msg, how = resume(RecoveryPolicy.REPLAY, req, store_ok=True)
    assert not msg.restore and msg.tokenwise and how == "recomputed"
    msg, how = resume(RecoveryPolicy.RESTART, request(0, tokens=4, skip=4), store_ok=True)  # after a restart
    assert isinstance(msg, P.AddRequest) and msg.prompt == [5, 6, 7] and how == "rerun"
    msg, how = resume(RecoveryPolicy.RESTART, req, store_ok=True)  # a drain under `restart`: no restart
    assert isinstance(msg, P.ResumeRequest) and not msg.restore and how == "recomputed"


def test_config_is_resolved_once_and_workers_read_it(tiny_models):
    cfg, model = EngineArgs(model=tiny_models["mixtral"], expert_workers=2, shadows=5, launcher="local",
                            kv_cache_blocks=8, max_model_len=4096, recovery="replay").create_config()
    assert cfg.model.dtype == "float32" and cfg.resilience.stores == 2 and cfg.resilience.shadows == 1
    assert cfg.resilience.recovery is RecoveryPolicy.REPLAY and cfg.cluster.placement in ("pack", "spread")
    assert cfg.scheduler.max_model_len == min(8 * 16, model.max_position_embeddings)  # the KV pool bounds it
    spec = WorkerSpec(name="aw0", role="attention", config=cfg, orch_endpoint="ipc://x", parent_pid=1)
    got = msgspec.json.decode(msgspec.json.encode(spec), type=WorkerSpec)
    assert got.config == cfg and (got.dtype, got.device, got.threads, got.probe_timeout_s) == ("float32", "cpu", 1, 0.1)
    # Packed, primaries on one expert worker per core, and small batches not split; spread, all.
    cores = os.cpu_count() or 1
    for placement, ews, primaries, split_min in (("pack", 3, min(3, cores), 24 if cores > 1 else 1), ("spread", 3, 3, 1),
                                                 ("pack", 1, 1, 1)):
        c, _ = EngineArgs(model=tiny_models["mixtral"], expert_workers=ews, placement=placement).create_config()
        assert (c.cluster.expert_primaries, c.scheduler.split_min) == (primaries, split_min)
    for bad in (dict(recovery="nope"), dict(placement="x"), dict(shadows=-1), dict(stores=0), dict(attention_workers=0),
                dict(micro_batches=0)):
        with pytest.raises(ValueError):
            EngineArgs(model=tiny_models["mixtral"], **bad).create_config()
    with pytest.raises(TypeError):
        EngineArgs(model=tiny_models["mixtral"], no_such_setting=1)


def test_a_stop_string_ends_the_request_once(tiny_models):
    tok = Tokenizer(tiny_models["mixtral"])
    ids = tok.encode("one two three four five", add_special_tokens=False)
    stop = tok.decode(ids[2:3]).strip()
    req, aborted = request(0, stop=[stop], tokenizer=tok), []
    req.tokens = list(ids)
    n = advance(req, aborted.append)
    assert aborted == [req] and req.finish_reason == FinishReason.STOP and req.stop_reason == stop
    assert stop not in req.detok.text and n <= len(ids)
    req.done.set()
    assert advance(req, aborted.append) == n and len(aborted) == 1  # told once
    out = output(req, n)
    assert out.token_ids == ids[:n] and out.text == req.detok.text

"""The OpenAI-compatible server: official client, streams through failures, truthful /health,
metrics, errors, fuzzing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import torch
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failover import wait_replaced, wait_until
from tarragon import LLM, SamplingParams
from tarragon.server import create_app

MODEL = "tiny"


class Server:
    def __init__(self, llm: LLM, **kw):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(llm, MODEL, **kw), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "server start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=3, max_model_len=1024) as llm:
        srv = Server(llm)
        try:
            yield llm, srv
        finally:
            srv.stop()


def client(srv, **kw):
    from openai import OpenAI

    return OpenAI(base_url=f"{srv.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def test_official_client_completions_and_chat(served):
    llm, srv = served
    c = client(srv)
    assert [m.id for m in c.models.list().data] == [MODEL]
    prompt = "def main():"
    expected = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))[0]
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == expected.text
    r = c.completions.create(model=MODEL, prompt=expected.prompt_token_ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected.text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, seed=3)
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert chat.choices[0].message.content == llm.generate([ids], SamplingParams(max_tokens=10, temperature=0))[0].text
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stop_strings_and_client_disconnect(served):
    llm, srv = served
    c = client(srv)
    full = c.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    r = c.completions.create(model=MODEL, prompt="import os", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.find(stop)]
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 900,
                      "ignore_eos": True, "stream": True}, timeout=30) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 5:
                break
    wait_until(lambda: not llm.queue_depth, 10, "the abandoned request to be cancelled")
    with pytest.raises(httpx.ReadTimeout):  # not streaming: the client gives up after 1 s
        httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1000, "ignore_eos": True}, timeout=1.0)
    wait_until(lambda: not llm.queue_depth, 30, "the abandoned non-streaming request to be cancelled")


def test_stream_survives_expert_then_attention_failure(served):
    llm, srv = served
    c = client(srv)
    args = dict(model=MODEL, prompt="class Server:", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    expected = c.completions.create(**args).choices[0].text
    pieces, times = [], []
    for _i, ch in enumerate(c.completions.create(stream=True, **args)):
        if ch.choices and ch.choices[0].text:
            pieces.append(ch.choices[0].text)
            times.append(time.monotonic())
        if len(pieces) == 60:
            llm.kill("ew1")
        if len(pieces) == 150:
            aw = next(iter(llm.in_flight())).worker
            llm.kill(aw)
    assert "".join(pieces) == expected
    gaps = [b - a for a, b in zip(times, times[1:])]
    print(f"\nlongest gap in the stream: {1000 * max(gaps):.0f} ms")
    kinds = [(e.kind, e.worker.rstrip("0123456789")) for e in llm.events()]
    assert ("worker_failed", "ew") in kinds and ("worker_failed", "aw") in kinds
    wait_replaced(llm, "ew1")


def scrape(srv) -> tuple[dict[str, str], dict[tuple, float]]:
    """(family -> type, (sample name, labels without model_name/engine) -> value); every series
    must carry the served model's name, as vLLM's do."""
    from prometheus_client.parser import text_string_to_metric_families

    types, values = {}, {}
    for fam in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text):
        types[fam.name] = fam.type
        for s in fam.samples:
            if s.name.startswith(("vllm:", "tarragon:")):
                assert s.labels.get("model_name") == MODEL and s.labels.get("engine") == "0", s
                values[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine"))))] = s.value
    return types, values


def test_metrics_as_vllm_names_them(served):
    llm, srv = served
    _, before = scrape(srv)
    client(srv).completions.create(model=MODEL, prompt="hello", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    types, after = scrape(srv)
    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)
    assert delta("vllm:generation_tokens_total") == 7 and delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1 and delta("vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:request_generation_tokens_count") == 1 and 0 <= after[("vllm:kv_cache_usage_perc", ())] <= 1
    ttft_buckets = sorted(float(dict(k[1])["le"]) for k in after if k[0] == "vllm:time_to_first_token_seconds_bucket")
    assert ttft_buckets[:3] == [0.001, 0.005, 0.01] and ttft_buckets[-2:] == [2560.0, float("inf")]
    for name in ("vllm:prompt_tokens", "vllm:request_success", "tarragon:failures_detected", "tarragon:expert_calls_replayed",
                 "tarragon:requests_restored", "tarragon:requests_recomputed", "tarragon:checkpoint_writes_dropped"):
        assert types[name] == "counter", name  # exposed as NAME_total
    assert after[("tarragon:failures_detected_total", (("role", "expert"),))] >= 1  # from the failure test above
    assert after[("tarragon:requests_restored_total", ())] >= 1 and after[("tarragon:routing_table_version", ())] >= 1
    assert after[("tarragon:stall_seconds_count", ())] >= 1


def test_errors_have_openai_shape(served):
    llm, srv = served
    u = f"{srv.url}/v1/completions"
    cases = [
        (httpx.post(u, content=b"{not json", headers={"content-type": "application/json"}), 400),
        (httpx.post(u, json={"model": MODEL}), 400),
        (httpx.post(u, json={"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400),
        (httpx.post(u, json={"model": MODEL, "prompt": "x", "n": 2}), 400),
        (httpx.post(u, json={"model": MODEL, "prompt": "x", "logit_bias": {"1": 2}}), 400),
        (httpx.post(u, json={"model": MODEL, "prompt": list(range(3, 1100))}), 400),
        (httpx.post(u, json={"model": MODEL, "prompt": [5, 10**9]}), 400),
        (httpx.post(u, json={"model": "gpt-4", "prompt": "x"}), 404),
        (httpx.get(f"{srv.url}/v1/nothing"), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["message"] and err["type"]
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_fault_injection_is_opt_in(served):
    """Without the flag the endpoints do not exist; with it, bad bodies get a 4xx. No worker is
    touched here: tests/test_bench.py injects real faults."""
    llm, srv = served
    alive = {w.name for w in llm.workers() if w.alive}  # earlier tests on this cluster killed some
    assert httpx.post(f"{srv.url}/tarragon/fault", json={"role": "expert"}).status_code == 404
    assert httpx.get(f"{srv.url}/tarragon/events").status_code == 404
    armed = Server(llm, fault_injection=True)
    try:
        u = f"{armed.url}/tarragon/fault"
        for body in ({"role": "gpu"}, {"role": "expert", "action": "reboot"}, {"role": "expert", "index": -1}, {"index": 0}):
            assert httpx.post(u, json=body).status_code == 400, body
        r = httpx.post(u, json={"role": "attention", "index": 99})
        assert r.status_code == 409 and "out of range" in r.json()["error"]["message"]
        events = httpx.get(f"{armed.url}/tarragon/events").json()
        assert events["recovery"] == "tarragon" and isinstance(events["events"], list) and events["now"] > 0
        assert all(events["now"] >= e["t"] for e in events["events"])  # one clock: the server's monotonic time
    finally:
        armed.stop()
    assert {w.name for w in llm.workers() if w.alive} == alive


def test_api_key_and_queue_limit(tiny_models):
    with LLM(tiny_models["olmoe"], attention_workers=1, expert_workers=1) as llm:
        srv = Server(llm, api_key="sesame", max_queue=2)
        try:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}
            assert httpx.post(f"{srv.url}/v1/completions", json=body).status_code == 401
            assert httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
            from openai import RateLimitError

            c = client(srv, api_key="sesame")
            streams = [c.completions.create(model=MODEL, prompt="x", max_tokens=400, stream=True, extra_body={"ignore_eos": True}) for _ in range(2)]
            with pytest.raises(RateLimitError):
                c.completions.create(model=MODEL, prompt="x", max_tokens=4)
            for s in streams:
                s.close()
        finally:
            srv.stop()


def test_health_tells_the_truth(tiny_models):
    with LLM(tiny_models["qwen2_moe"], attention_workers=1, expert_workers=2, shadows=0) as llm:
        srv = Server(llm)
        try:
            for victim in ("ew0", "aw0"):
                assert httpx.get(f"{srv.url}/health").status_code == 200
                llm.kill(victim)
                wait_until(lambda: httpx.get(f"{srv.url}/health").status_code == 503, 10, "health to turn 503")
                statuses = []
                while not statuses or statuses[-1] != 200:
                    statuses.append(httpx.get(f"{srv.url}/health").status_code)
                    time.sleep(0.02)
                ready = [e.t for e in llm.events() if e.kind == "replacement_ready"]
                assert len(ready) == (1 if victim == "ew0" else 2)  # 200 only once the replacement is in
                assert httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}).status_code == 200
        finally:
            srv.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "ignore_eos", "stop_token_ids", "logprobs", "role", "content"]
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=8).map(
    lambda d: {**d, "max_tokens": d["max_tokens"]} if isinstance(d.get("max_tokens"), int) and 0 < d["max_tokens"] < 8 else {**d, "max_tokens": 2})


# CI's bounded form; a soak run: TARRAGON_FUZZ_EXAMPLES=5000 ./test.sh tests/test_server.py -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("TARRAGON_FUZZ_EXAMPLES", "300"))


@pytest.mark.timeout(max(300, FUZZ_EXAMPLES // 2))
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies, raw=st.booleans())
def test_fuzzing_never_gives_5xx(served, path, body, raw):
    llm, srv = served
    content = json.dumps(body).encode()[: len(json.dumps(body)) // 2] if raw else json.dumps(body).encode()
    r = httpx.post(f"{srv.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (body, r.text)
    assert r.status_code == 200 or "error" in r.json()


def sse(resp: httpx.Response) -> list[dict]:
    """The JSON chunks of an event stream, up to [DONE] (which must be there)."""
    lines = [ln[6:] for ln in resp.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]", resp.text[-300:]
    return [json.loads(x) for x in lines[:-1]]


def test_vllm_bench_and_sdk_shaped_bodies(served, caplog):
    """What `vllm bench serve`, the OpenAI SDK, LangChain and LiteLLM send is accepted; fields
    that cannot be honoured at their value are a 400 naming them."""
    llm, srv = served
    u = srv.url
    # vllm bench serve, completions: repetition_penalty 1.0 and logprobs null, always
    body = {"model": MODEL, "prompt": "hello", "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks = sse(httpx.post(f"{u}/v1/completions", json=body, timeout=60))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    # vllm bench serve, chat: content as a list of parts, max_completion_tokens
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "temperature": 0.0,
            "max_completion_tokens": 6, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks = sse(httpx.post(f"{u}/v1/chat/completions", json=body, timeout=60))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1]["usage"]["completion_tokens"] == 6
    # SDK / LangChain / LiteLLM shapes: every role, parts, zero penalties, logprobs false, unknown extras
    sdk = {"model": MODEL, "temperature": 0, "max_tokens": 6, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
           "response_format": {"type": "text"}, "user": "u-1", "n": 1, "top_p": 1, "stream": False, "tool_choice": "none",
           "tools": [], "parallel_tool_calls": True, "metadata": {"a": "b"}, "some_future_field": {"x": 1},
           "messages": [{"role": "developer", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": None, "tool_calls": []},
                        {"role": "tool", "content": "42", "tool_call_id": "c1"}]}
    r = httpx.post(f"{u}/v1/chat/completions", json=sdk, timeout=60)
    assert r.status_code == 200, r.text
    assert "some_future_field" in caplog.text  # an unknown field: ignored, with a warning in the log
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere"}, {"role": "assistant"},
             {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(plain), add_special_tokens=False)
    assert r.json()["choices"][0]["message"]["content"] == llm.generate([ids], SamplingParams(max_tokens=6, temperature=0))[0].text
    for field, value in [("logit_bias", {"5": 1}), ("n", 2), ("best_of", 3), ("response_format", {"type": "json_object"}),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]), ("min_tokens", 4), ("echo", True)]:
        r = httpx.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    r = httpx.post(f"{u}/v1/chat/completions", json={**sdk, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_context_limits_tokenize_version(served):
    """Prompt + max_tokens beyond the context is a 400 (vLLM's wording); chat without max_tokens
    may use the rest of the context; /tokenize, /detokenize and /version as vLLM has them."""
    llm, srv = served
    u = srv.url
    assert httpx.get(f"{u}/version").json()["version"]
    r = httpx.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": list(range(3, 1003)), "max_tokens": 100})
    assert r.status_code == 400 and "maximum context length is 1024" in r.json()["error"]["message"]
    messages = [{"role": "user", "content": "word " * 300}]
    tok = httpx.post(f"{u}/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert tok["max_model_len"] == 1024 and tok["count"] == len(tok["tokens"]) > 850
    assert httpx.post(f"{u}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == llm.tokenizer.decode(tok["tokens"])
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": MODEL, "messages": messages, "ignore_eos": True}, timeout=120).json()
    assert r["usage"] == {"prompt_tokens": tok["count"], "completion_tokens": 1024 - tok["count"], "total_tokens": 1024}
    assert httpx.post(f"{u}/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_logprobs_and_finish_on_the_last_token(served):
    """Streamed logprobs are the model's own (checked against the prompt logits of the whole
    sequence), and the chunk with finish_reason carries the last token."""
    llm, srv = served
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 10, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    chunks = sse(httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60))
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    lps = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["logprobs"]["tokens"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and len(tokens) == 10
    full = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert full["logprobs"]["tokens"] == tokens and "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    out = llm.generate("def main():", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2))[0]
    seq = out.prompt_token_ids + out.token_ids
    logits = llm.generate([seq], SamplingParams(max_tokens=1, temperature=0, prompt_logits=True))[0].prompt_logits
    ref = torch.log_softmax(logits, -1)[len(out.prompt_token_ids) - 1: -1].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lps), ref, atol=1e-4) and [lp.ids[0] for lp in out.logprobs] == out.token_ids
    assert all(lp.ids[1] == out.token_ids[i] for i, lp in enumerate(out.logprobs))  # greedy: the sampled one is the top one
    # chat: logprobs true + top_logprobs
    chat = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                      "max_tokens": 3, "logprobs": True, "top_logprobs": 3, "ignore_eos": True}, timeout=60).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)


def test_penalty_formulas_are_vllms():
    """Repetition penalty as transformers' (and vLLM's) over prompt + output; frequency and
    presence subtracted per output occurrence / once per output token."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from tarragon.sampling import apply_penalties

    logits, prompt, output = torch.randn(50, generator=torch.Generator().manual_seed(0)), [1, 2, 3], [3, 4, 4, 5, 4]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[None].clone())[0]
    counts = torch.bincount(torch.tensor(output), minlength=50)
    want -= 0.5 * counts + 0.25 * (counts > 0)
    got = apply_penalties(logits, SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25), prompt, output)
    assert torch.allclose(got, want) and not torch.equal(got, logits)


def test_penalties_as_vllm_defines_them_and_through_failover(served):
    """Greedy with penalties picks, at every step, the argmax of the penalised logits (vLLM's
    formulas, from the model's own logits); a penalised, seeded request moved to another
    attention worker by a SIGKILL gives the same tokens as without the failure."""
    from tarragon.sampling import apply_penalties

    llm, srv = served
    pen = dict(repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.4)
    prompt = llm.tokenizer.encode("abc abc abc abc abc")
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                       "ignore_eos": True, **pen}, timeout=60).json()
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **pen))[0]
    assert r["choices"][0]["text"] == out.text
    plain = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert plain.token_ids != out.token_ids  # the penalties change something
    logits = llm.generate([prompt + out.token_ids[:-1]], SamplingParams(max_tokens=1, temperature=0, prompt_logits=True))[0].prompt_logits
    params = SamplingParams(**pen)
    for i, tok in enumerate(out.token_ids):
        assert int(apply_penalties(logits[len(prompt) - 1 + i], params, prompt, out.token_ids[:i]).argmax()) == tok, i

    sampled = SamplingParams(max_tokens=120, temperature=0.8, seed=7, ignore_eos=True, **pen)
    expected = llm.generate([prompt], sampled)[0].token_ids
    req = llm.submit(prompt, sampled)
    wait_until(lambda: len(req.tokens) >= 30, 60, "tokens before the kill")
    victim = req.worker
    llm.kill(victim)
    assert llm.wait(req, 120).token_ids == expected
    wait_until(lambda: sum(w.role == "attention" and w.state == "ready" for w in llm.workers()) >= 2, 90, "a replacement AW")


def test_generate_stops_at_stop_strings(served):
    llm, _ = served
    full = llm.generate("import os", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = full.text[6:9]
    cut = llm.generate("import os", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 30
    kept = llm.generate("import os", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.text == full.text[: full.text.find(stop) + len(stop)]


BREAK_AND_DATE = ("{%- for m in messages %}{%- if m['role'] == 'assistant' %}{% break %}{% endif %}"
                  "{{ m['role'] }}: {{ m['content'] | tojson }}\n{%- endfor %}Today: {{ strftime_now('%Y-%m-%d') }}")


@pytest.mark.parametrize("with_transformers", [True, False])
def test_chat_templates_render_as_transformers(tiny_models, tmp_path, monkeypatch, with_transformers):
    """Real templates (Llama 4's, as transformers ships it: tools through tojson) and one with
    {% break %} and strftime_now render exactly as transformers' tokenizer renders them, through
    transformers' renderer and through the Jinja2 fallback used without transformers."""
    import shutil
    import sys

    from transformers import AutoTokenizer
    from transformers.models.llama4.processing_llama4 import chat_template as llama4

    from tarragon.tokenizer import Tokenizer

    messages = [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Wetter in Zürich? 東京?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "weather",
                 "arguments": {"city": "Zürich"}}}]}, {"role": "tool", "content": {"temp": "12°C"}}]
    tools = [{"type": "function", "function": {"name": "weather", "description": "Météo", "parameters": {"type": "object"}}}]
    for i, (template, kw) in enumerate([(llama4, {"tools": tools}), (BREAK_AND_DATE, {})]):
        d = tmp_path / str(i)
        shutil.copytree(tiny_models["mixtral"], d)
        (d / "chat_template.jinja").write_text(template)
        want = AutoTokenizer.from_pretrained(d).apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        if not with_transformers:
            monkeypatch.setitem(sys.modules, "transformers.utils.chat_template_utils", None)  # import fails: the fallback
        assert Tokenizer(d).apply_chat_template(messages, **kw) == want
        monkeypatch.undo()
    assert "Zürich" in want or "12°C" in want


def hub_cache(root, model_dir: str, repo: str = "tiny-org/moe"):
    """HF_HOME laid out as huggingface_hub's cache holding `model_dir` as `repo`'s main revision."""
    import shutil

    entry = root / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, entry / "snapshots" / "0123abcd")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    return root


def test_serve_cli_like_a_server(tiny_models, tmp_path):
    """`tarragon serve ORG/NAME` from the Hugging Face cache (offline); a busy port and a model
    nowhere to be found fail at once in one line; the log tells start-up, each request and each
    failure/replacement; --log-dir survives; a SIGKILLed orchestrator is replaced and the server
    goes on serving; SIGINT stops it cleanly."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(hub_cache(tmp_path / "hf", tiny_models["mixtral"])), "HF_HUB_OFFLINE": "1"}
    serve = [sys.executable, "-m", "tarragon", "serve", "--attention-workers", "1", "--expert-workers", "2", "--host", "127.0.0.1"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t0 = time.monotonic()
        r = subprocess.run([*serve, "tiny-org/moe", "--port", str(busy.getsockname()[1])], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "cannot listen" in r.stderr and "workers ready" not in r.stderr, r.stderr
        assert time.monotonic() - t0 < 20  # no cluster was started
    r = subprocess.run([*serve, "tiny-org/missing", "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "HF_HUB_OFFLINE" in r.stderr.strip().splitlines()[-1]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path, log_dir = tmp_path / "serve.log", tmp_path / "logs"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*serve, "tiny-org/moe", "--port", str(port), "--log-dir", str(log_dir)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ok(f"{url}/health"), 180, "the server to be healthy")
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-org/moe"
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny-org/moe", "prompt": "hi", "max_tokens": 3}).status_code == 200
        workers = httpx.get(f"{url}/v1/cluster").json()["workers"]
        victim = next(w for w in workers if w["role"] == "expert" and w["state"] == "ready")  # a loaded machine may have replaced some
        os.kill(victim["pid"], signal.SIGKILL)
        failed = f"tarragon.events: worker_failed {victim['name']}"
        wait_until(lambda: failed in (t := log_path.read_text()) and "replacement_ready" in t[t.index(failed):], 120, "the replacement in the log")
        os.kill(next(w["pid"] for w in workers if w["role"] == "orchestrator"), signal.SIGKILL)
        wait_until(lambda: "orchestrator_replaced" in log_path.read_text(), 60, "the orchestrator's successor in the log")
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny-org/moe", "prompt": "hi", "max_tokens": 3}, timeout=60).status_code == 200
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGINT)  # as Ctrl-C would, to the server alone
        assert proc.wait(60) == 130  # as a shell reports Ctrl-C
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log_path.read_text()
    # Progress lines (there may be no terminal for the bar); a loaded machine may skip a count.
    assert re.search(r"workers ready: \d+ of \d+", text) and '"POST /v1/completions HTTP/1.1" 200' in text and "Traceback" not in text
    assert {"aw0.log", "ew0.log", "orchestrator.log"} <= {p.name for p in log_dir.iterdir()}


def test_serve_stopped_by_sigterm_shuts_the_cluster_down_and_removes_its_run_folder(tiny_models):
    """SIGTERM, as a service manager stops a server: exit status 0, every worker gone, and the run
    folder (sockets, logs, the cluster key) removed, not left for the next start to find."""
    import glob
    import subprocess
    import sys
    import tempfile

    from test_processes import pid_alive

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tarragon", "serve", "--model", tiny_models["mixtral"], "--attention-workers", "1",
                             "--expert-workers", "1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: _ok(f"http://127.0.0.1:{port}/health"), 120, "the server to be healthy")
        pids = [w["pid"] for w in httpx.get(f"http://127.0.0.1:{port}/v1/cluster").json()["workers"]]
        (run_dir,) = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), "tarragon-*"))
                      if os.path.exists(f"{d}/driver") and open(f"{d}/driver").read().split()[0] == str(proc.pid)]
        os.kill(proc.pid, signal.SIGTERM)  # to the server alone
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not os.path.exists(run_dir)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "every worker gone")


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_bench_takes_vllm_flags_and_chat(served, tmp_path, capsys):
    """`tarragon bench` against a running server with `vllm bench serve`'s flags, chat backend
    included, writing vLLM's result keys; an unreachable server is a one-line error."""
    from tarragon.cli import main

    _, srv = served
    host, port = srv.url.rsplit(":", 1)
    argv = ["bench", "--host", host.split("//")[1], "--port", port, "--backend", "openai-chat", "--num-prompts", "4",
            "--random-input-len", "8", "--random-output-len", "6", "--random-range-ratio", "0.5", "--disable-tqdm", "--save-result",
            "--result-dir", str(tmp_path), "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90", "--goodput", "e2el:600000"]
    assert main(argv) == 0
    (path,) = tmp_path.glob("openai-chat-infqps-*.json")
    saved = json.loads(path.read_text())
    assert saved["completed"] == 4 and saved["failed"] == 0 and saved["p90_e2el_ms"] >= saved["p50_e2el_ms"] > 0
    assert saved["request_goodput"] == saved["request_throughput"] > 0 and "p99_itl_ms" not in saved and saved["faults"] == []
    assert "P90 TTFT (ms):" in capsys.readouterr().out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert main(["bench", "--port", str(free), "--num-prompts", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the server" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "--base-url", srv.url, "--goodput", "ttft=5"]) == 2 and "--goodput" in capsys.readouterr().err


def test_http_limits(served):
    """Issue 16's HTTP half: a body over the limit is a 413 (declared or chunked), a prompt that
    cannot fit is refused before tokenizing, stop lists are capped, the docs routes are off."""
    _, srv = served
    u = f"{srv.url}/v1/completions"
    assert httpx.post(u, content=b"x" * (9 << 20), headers={"content-type": "application/json"}).status_code == 413

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(9):
            yield b"a" * (1 << 20)
        yield b'"}'
    assert httpx.post(u, content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    t0 = time.monotonic()
    r = httpx.post(u, json={"model": MODEL, "prompt": "word " * 200_000})
    assert r.status_code == 400 and "cannot hold" in r.json()["error"]["message"] and time.monotonic() - t0 < 2
    assert httpx.post(u, json={"model": MODEL, "prompt": "x", "stop": ["a"] * 65}).status_code == 400
    assert httpx.post(u, json={"model": MODEL, "prompt": "x", "stop_token_ids": [5] * 5000}).status_code == 400
    ok = httpx.post(u, json={"model": MODEL, "prompt": "x", "max_tokens": 3, "stop_token_ids": list(range(900, 1000)), "stop": ["zz" * 300]})
    assert ok.status_code == 200, ok.text
    assert all(httpx.get(f"{srv.url}{p}").status_code == 404 for p in ("/docs", "/redoc", "/openapi.json"))


def test_tokenizing_a_long_prompt_leaves_other_threads_running(served):
    """Tokenization runs on a worker thread; `tokenizers`' plain encode holds the GIL throughout
    (3 MB: 3 s during which the event loop could not run), its batch encode releases it."""
    llm, _ = served
    text = "word " * 600_000
    ticks, busy = [], threading.Event()

    def tick():
        while not busy.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.002)
    t = threading.Thread(target=tick)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="600001 tokens|tokens"):
            llm.tokenizer.encode(text, max_tokens=llm.max_model_len)
        took = time.monotonic() - t0
    finally:
        busy.set()
        t.join()
    gap = max(b - a for a, b in zip(ticks, ticks[1:]))
    print(f"\ntokenizing 3 MB: {1000 * took:.0f} ms; the other thread's largest gap {1000 * gap:.0f} ms")
    assert gap < took / 4, (gap, took)  # with the GIL held it is the whole tokenization


def _stream_times(srv, times: list[float], stop: threading.Event) -> None:
    """When each streamed token arrives, until `stop`: a stream that ends (a fast machine gets
    through 1,000 tokens in a few seconds) is followed by the next one at once."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    times.append(time.monotonic())
                if stop.is_set():
                    return


def test_a_3mb_prompt_does_not_stall_other_streams(served):
    """Issue 16: while one client sends 3 MB prompts (text, token ids, chat: 413 before parsing;
    a prompt just under the character cap: tokenized off the loop, then a 400), another's stream
    goes on: its largest gap in the attack windows vs in equal windows just before them, and
    /health's latency meanwhile. Everything shares this process's GIL (driver, server, clients), so
    the bodies are encoded before the windows. The assert is on the median of 3 tries, and is
    "the attack adds < 100 ms to the quiet windows' largest gap": a loaded 2-core CI box has
    100 ms hiccups of its own. Measured on a quiet machine: 20-50 ms either way."""
    llm, srv = served
    big_text = "word " * 600_000
    attacks = [("/v1/completions", {"model": MODEL, "prompt": big_text}, 413),
               ("/v1/completions", {"model": MODEL, "prompt": list(range(1, 500)) * 1200}, 413),
               ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": big_text}]}, 413),
               ("/tokenize", {"model": MODEL, "prompt": big_text}, 413),
               ("/v1/completions", {"model": MODEL, "prompt": "word " * (llm.max_model_len * 64 // 5 - 10)}, 400)]
    attacks = [(path, json.dumps(body).encode(), status) for path, body, status in attacks]  # encoded here: 60 ms of GIL
    times, stop = [], threading.Event()
    streamer = threading.Thread(target=_stream_times, args=(srv, times, stop))
    streamer.start()
    windows, health_ms = [], []
    try:
        wait_until(lambda: len(times) > 5, 30, "the stream to start")
        with httpx.Client(timeout=30) as c:
            for _ in range(3):
                quiet = time.monotonic()
                time.sleep(1.0)
                start = time.monotonic()
                for path, body, status in attacks:
                    r = c.post(f"{srv.url}{path}", content=body, headers={"content-type": "application/json"})
                    assert r.status_code == status, (path, r.status_code, r.text[:200])
                    t0 = time.monotonic()
                    assert c.get(f"{srv.url}/health").status_code == 200
                    health_ms.append(1000 * (time.monotonic() - t0))
                end = time.monotonic()
                windows.append((quiet, start, end))
    finally:
        stop.set()
        streamer.join(60)

    def largest_gap(a: float, b: float) -> float:
        return max((y - x for x, y in zip(times, times[1:]) if a < y <= b + 0.05), default=float("inf"))
    quiet_gaps = [largest_gap(q, s) for q, s, _ in windows]
    attack_gaps = [largest_gap(s, e) for _, s, e in windows]
    med = sorted(attack_gaps)[1]
    print(f"\nlargest stream gap, quiet windows: {[round(1000 * g) for g in quiet_gaps]} ms; while 3 MB prompts are sent: "
          f"{[round(1000 * g) for g in attack_gaps]} ms (median {1000 * med:.0f} ms); /health max {max(health_ms):.0f} ms")
    assert med < 0.1 + sorted(quiet_gaps)[1], (attack_gaps, quiet_gaps)
    assert max(health_ms) < 1000


WORDS = "def class import return the a of to in and for while if else print self x y value data list".split()


def valid_body(rng, vocab: int) -> tuple[str, dict]:
    """A request the server must serve: the model's name, sampling anywhere in its real ranges."""
    chat = rng.random() < 0.4
    body: dict = {"max_tokens": rng.randint(1, 64)}
    if rng.random() < 0.8:
        body["model"] = MODEL
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))  # noqa: E731
    if chat:
        roles = ["system"] * (rng.random() < 0.3) + ["user"] + ["assistant", "user"] * rng.randint(0, 1)
        body["messages"] = [{"role": r, "content": text()} for r in roles]
    else:
        body["prompt"] = text() if rng.random() < 0.6 else [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
    if rng.random() < 0.4:
        body["temperature"] = 0.0
    else:
        body |= {"temperature": round(rng.uniform(0.1, 2.0), 3), "seed": rng.randrange(2**63)}
        if rng.random() < 0.5:
            body["top_p"] = round(rng.uniform(0.05, 1.0), 3)
        if rng.random() < 0.5:
            body["top_k"] = rng.choice([-1, 1, 2, 5, 50])
        if rng.random() < 0.3:
            body["min_p"] = round(rng.uniform(0, 0.5), 3)
    for k, lo, hi in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2), ("repetition_penalty", 0.5, 2)):
        if rng.random() < 0.3:
            body[k] = round(rng.uniform(lo, hi), 3)
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(WORDS)[:2] for _ in range(rng.randint(1, 3))]
        body["include_stop_str_in_output"] = rng.random() < 0.5
    if rng.random() < 0.2:
        body["stop_token_ids"] = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
    if rng.random() < 0.3:
        if chat:
            body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5)}
        else:
            body["logprobs"] = rng.randint(0, 5)
    body["ignore_eos"] = rng.random() < 0.5
    body["n"] = 1 if rng.random() < 0.2 else None
    body = {k: v for k, v in body.items() if v is not None}
    if rng.random() < 0.5:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


INVALID = [("temperature", -0.5), ("top_p", 0.0), ("max_tokens", 0), ("max_tokens", 5000), ("model", "nope"), ("n", 2),
           ("top_k", -5), ("logprobs", 99), ("seed", -1), ("stop", ["s"] * 70), ("presence_penalty", 3.0)]


def fuzz_call(srv, path: str, body: dict, disconnect_after: int | None) -> tuple[int, str | None, str | None]:
    """(status, text or None, finish reason); a stream must end with [DONE] after its finish
    chunk; `disconnect_after` chunks: the client leaves mid-stream (or, not streaming, after 0.3 s)."""
    with httpx.Client(timeout=120) as c:
        if not body.get("stream"):
            try:
                r = c.post(f"{srv.url}{path}", json=body, timeout=0.3 if disconnect_after is not None else 120)
            except httpx.ReadTimeout:
                return 0, None, None
            if r.status_code != 200:
                return r.status_code, None, None
            ch = r.json()["choices"][0]
            return 200, ch["message"]["content"] if "message" in ch else ch["text"], ch["finish_reason"]
        with c.stream("POST", f"{srv.url}{path}", json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, None, None
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                if disconnect_after is not None and len(lines) >= disconnect_after:
                    return 0, None, None
    assert lines and lines[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(x) for x in lines[:-1]]
    assert not any("error" in ch for ch in chunks), chunks[-1]
    deltas = [ch["choices"][0] for ch in chunks if ch.get("choices")]
    text = "".join((d.get("delta") or {}).get("content") or d.get("text") or "" for d in deltas)
    return 200, text, deltas[-1]["finish_reason"]


@pytest.mark.timeout(180)
def test_http_fuzz_reaches_the_engine_through_failures(served):
    """Issue 16: generated bodies that reach the engine (valid model, real sampling ranges,
    streams and not, disconnects, 8 concurrent clients), plus invalid ones, twice: without
    failures, then with an expert worker and an attention worker SIGKILLed through the fault
    endpoint meanwhile. No 5xx; every valid request completes; no worker but the two dies;
    the outputs of greedy and seeded requests are the same both times. Seeded generation, not
    hypothesis: a run is one concurrent batch, not a sequence of shrinkable examples."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    llm, srv = served
    rng = random.Random(16)
    vocab = llm.model_config.vocab_size
    calls = []
    for i in range(48):
        path, body = valid_body(rng, vocab)
        if i % 8 == 7:
            k, v = INVALID[rng.randrange(len(INVALID))]
            calls.append((path, {**body, k: v}, None, "invalid"))
        else:
            calls.append((path, body, rng.randint(1, 4) if i % 8 == 3 else None, "valid"))
    armed = Server(llm, fault_injection=True)

    def run(inject: bool) -> list:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(fuzz_call, srv, *c[:3]) for c in calls]
            if inject:
                for role, after in (("expert", 12), ("attention", 28)):
                    wait_until(lambda: sum(f.done() for f in futures) >= after, 60, f"{after} requests done")
                    r = httpx.post(f"{armed.url}/tarragon/fault", json={"role": role, "index": 0})
                    assert r.status_code == 200, r.text
                    killed.append(r.json()["victim"])
            return [f.result() for f in futures]

    killed: list[str] = []
    try:
        t0 = time.monotonic()
        quiet = run(False)
        t1 = time.monotonic()
        faulty = run(True)
        t2 = time.monotonic()
    finally:
        armed.stop()
    compared = 0
    for (path, body, leave, kind), a, b in zip(calls, quiet, faulty):
        for status, text, reason in (a, b):
            assert status < 500, (path, body, status)
            if kind == "invalid":
                assert 400 <= status < 500, (path, body, status)
            elif leave is None:
                assert status == 200 and reason in ("stop", "length"), (path, body, status, reason)
        if kind == "valid" and leave is None and (body.get("temperature") == 0 or "seed" in body):
            assert a[1:] == b[1:], (path, body, a, b)
            compared += 1
    wait_until(lambda: not llm.queue_depth, 30, "every request (and abandoned one) to end")
    failures = [e for e in llm.events() if e.kind == "worker_failed" and e.t >= t1]
    unexpected = {e.worker for e in failures} - set(killed)
    assert {e.worker for e in failures} == set(killed), (
        killed, [(e.worker, e.detail) for e in failures],
        {w: llm.client.launcher.log_tail(w, 30) for w in [*unexpected, "orchestrator"]})
    print(f"\nfuzz: {len(calls)} bodies x 2, {compared} outputs compared; {t1 - t0:.1f} s without failures, "
          f"{t2 - t1:.1f} s with {killed} killed")
    for name in killed:
        wait_replaced(llm, name)

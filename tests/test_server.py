"""The OpenAI-compatible server: official client, streams through failures, truthful /health,
metrics, errors, fuzzing."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
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
    wait_until(lambda: not llm._requests, 10, "the abandoned request to be cancelled")


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
            with llm._lock:
                aw = next(iter(llm._requests.values())).worker
            llm.kill(aw)
    assert "".join(pieces) == expected
    gaps = [b - a for a, b in zip(times, times[1:])]
    print(f"\nlongest gap in the stream: {1000 * max(gaps):.0f} ms")
    kinds = [(e.kind, e.worker.rstrip("0123456789")) for e in llm.events()]
    assert ("worker_failed", "ew") in kinds and ("worker_failed", "aw") in kinds
    wait_replaced(llm, "ew1")


def test_metrics_move(served):
    llm, srv = served
    def scrape() -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{srv.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out
    before = scrape()
    client(srv).completions.create(model=MODEL, prompt="hello", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    after = scrape()
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == 7
    assert after['vllm:request_success_total{finished_reason="length"}'] > before.get('vllm:request_success_total{finished_reason="length"}', 0)
    assert after["vllm:time_to_first_token_seconds_count"] > before.get("vllm:time_to_first_token_seconds_count", 0)
    assert after.get('tarragon:failures_detected{role="expert"}', 0) >= 1  # from the failure test above
    assert after["tarragon:routing_table_version"] >= 1 and after["tarragon:checkpoint_bytes"] >= 0
    assert after["tarragon:stall_seconds_count"] >= 1


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
FUZZ_EXAMPLES = int(os.environ.get("TARRAGON_FUZZ_EXAMPLES", "400"))


@pytest.mark.timeout(max(300, FUZZ_EXAMPLES // 2))
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies, raw=st.booleans())
def test_fuzzing_never_gives_5xx(served, path, body, raw):
    llm, srv = served
    content = json.dumps(body).encode()[: len(json.dumps(body)) // 2] if raw else json.dumps(body).encode()
    r = httpx.post(f"{srv.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (body, r.text)
    assert r.status_code == 200 or "error" in r.json()

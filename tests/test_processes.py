"""Processes as failure domains: cleanup when the driver dies, garbage on the datapath."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import prompts_of_lengths
from tarragon import LLM, SamplingParams


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: its parent just has not reaped it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_die_with_a_killed_driver(tiny_models):
    script = textwrap.dedent(f"""
        import sys, time
        from tarragon import LLM, SamplingParams
        llm = LLM({tiny_models['mixtral']!r}, attention_workers=2, expert_workers=3)
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
        print(" ".join(str(w.pid) for w in llm.workers()), flush=True)
        print(llm.run_dir, flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        run_dir = Path(driver.stdout.readline().strip())
        assert sum(pid_alive(p) for p in pids) >= 7  # orchestrator, store, 2 AWs, 3 EWs (+ any replacement)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        deadline = time.monotonic() + 5.0
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if pid_alive(p)], "workers outlived their driver"
        assert run_dir.is_dir()  # SIGKILL leaves the run folder; the next driver's start removes it
        from tarragon.procfs import remove_orphaned_run_dirs

        remove_orphaned_run_dirs()
        assert not run_dir.exists()
    finally:
        driver.kill()
        for p in pids if "pids" in dir() else []:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_leaving_the_with_block_ends_every_process(tiny_models):
    with LLM(tiny_models["mixtral"], attention_workers=2, expert_workers=2) as llm:
        pids = [w.pid for w in llm.workers()]
    assert not any(pid_alive(p) for p in pids)


def test_malformed_datapath_messages_are_dropped(tiny_models):
    """Garbage sent to an expert worker's socket is logged and dropped; serving goes on."""
    prompts = prompts_of_lengths([6, 11], 1024)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(tiny_models["mixtral"], attention_workers=1, expert_workers=2) as llm:
        before = [o.token_ids for o in llm.generate(prompts, params)]
        from link_client import LinkClient

        s = LinkClient(llm.launcher.endpoint("ew0"), "garbage")  # in the 0700 run folder: this user's processes
        garbage = [
            [b"\x00\xff not msgpack"],
            [b"\x81\xa4type\xadExpertRequest"],  # tag, no fields
            [b"\xc1"],
        ]
        from tarragon import protocol as P
        import torch

        x = torch.zeros(3, 64)
        bad = P.ExpertRequest(1, 0, [0], [5], P.tensor_meta(x))  # counts disagree with rows
        garbage.append(P.encode(bad, x))
        wrong_layer = P.ExpertRequest(2, 99, [0], [3], P.tensor_meta(x))
        garbage.append(P.encode(wrong_layer, x))
        short = P.ExpertRequest(3, 0, [0], [3], P.TensorMeta("float32", [3, 64]))
        garbage.append([P.encode(short)[0], b"\x00" * 17])
        for msg in garbage:
            s.send_multipart(msg)
        time.sleep(0.3)
        s.close()
        # framing that makes no sense, and a link that does not say who it is: cut off
        broken = [("huge", b"\xff" * 64), ("no-frames", b"\x05\x00\x00\x00\x00\x00\x00\x00\x00"),
                  ("liar", b"\x10\x00\x00\x00\x01\x00\x00\x00\xff\x00\x00\x00" + b"\x00" * 8)]  # (255 bytes said, 8 sent)
        for name, raw in broken:
            c = LinkClient(llm.launcher.endpoint("ew0"), name)
            c.send_raw(raw)
            assert c.closed_by_peer(), f"{raw!r}: the expert worker kept the link"
            c.close()
        c = LinkClient(llm.launcher.endpoint("ew0"), None)
        c.send_multipart(P.encode(bad, x))  # a request before any Hello
        assert c.closed_by_peer()
        c.close()
        assert all(w.alive for w in llm.workers())
        after = [o.token_ids for o in llm.generate(prompts, params)]
        log = (llm.launcher.log_path("ew0")).read_text()
    assert before == after
    dropped = [int(n) for n in re.findall(r"dropped (\d+) message\(s\) from", log)]
    assert dropped and dropped[0] == 1  # the first is logged at once; the rest within a second are counted
    assert "bad framing" in log and "frame lengths do not add up" in log and "did not start with Hello" in log


def test_an_expert_worker_polls_for_the_next_call_only_when_it_follows_at_once(tiny_models, monkeypatch):
    """After a call marked `linger` (its sender calls again within microseconds), an expert worker
    polls for the next one (here for 5 ms) rather than sleep; after any other call, it sleeps.
    Seen in its CPU time."""
    import torch

    from link_client import LinkClient
    from tarragon import protocol as P

    monkeypatch.setenv("TARRAGON_SPIN_US", "5000")  # (the workers' environment)
    with LLM(tiny_models["mixtral"], attention_workers=1, expert_workers=2) as llm:
        llm.generate(prompts_of_lengths([6], 1024), SamplingParams(max_tokens=4))
        pid = next(w.pid for w in llm.workers() if w.name == "ew0")
        c = LinkClient(llm.launcher.endpoint("ew0"), "prober")
        x = torch.zeros(3, 64)

        def cpu_ms() -> float:
            return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in os.listdir(f"/proc/{pid}/task")) / 1e6

        def calls(linger: bool) -> float:
            before = cpu_ms()
            for i in range(10):
                c.send_multipart(P.encode(P.ExpertRequest(i, 0, [0], [3], P.tensor_meta(x), linger=linger), x))
                assert c.poll(5000), "no reply"
                c.s.recv(1 << 20)
                time.sleep(0.02)
            return cpu_ms() - before

        try:
            sleeping, polling = calls(False), calls(True)
        finally:
            c.close()
    assert polling > sleeping + 25, (sleeping, polling)  # 10 x 5 ms polled


def test_cli_make_model_and_generate(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "tarragon", "make-model", "--family", "qwen3_moe", "--size", "tiny", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "tarragon", "generate", "--model", str(out), "--attention-workers", "2",
                        "--expert-workers", "2", "--max-tokens", "30", "--failover", "def main():", "import os"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "(30 tokens, length)" in r.stdout and "tokens/s" in r.stdout
    # --failover: an expert worker, then an attention worker killed mid-way, then the latter under
    # --recovery restart; the same tokens every time, one stall figure each
    assert r.stdout.count("tokens identical to the failure-free run: yes") == 3, r.stdout
    assert r.stdout.count(" ms (largest gap before: ") == 3 and "requests_reassigned" in r.stdout

"""A `tarragon serve` of the benchmark's own: started on a free local port with fault injection
on, waited for until its cluster is whole, stopped with every worker it started.

Apart from the client so that the client works against any server (`--base-url`, another host);
the bench/ scripts start several of these side by side.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..vocabulary import WorkerState


class Server:
    """`tarragon serve ARGS --enable-fault-injection` on a free local port, in its own process
    group, stopped (with its whole cluster) on exit."""

    def __init__(self, args: list[str], api_key: str | None = None, wait: bool = True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tarragon-bench-server-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent.parent), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "tarragon", "serve", *args, "--host", "127.0.0.1", "--port", str(port), "--enable-fault-injection"]
        if api_key:
            cmd += ["--api-key", api_key]
        from ..worker import die_with_parent

        me = os.getpid()  # if this process dies, so does the server (and with it its cluster)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     preexec_fn=lambda: die_with_parent(me))
        if wait:
            try:
                self.wait_started()
            except BaseException:
                self.stop()
                raise

    def wait_started(self, timeout: float = 300.0) -> None:
        self.roles = wait_healthy(self.url, timeout=timeout, proc=self.proc, log=self.log.name)
        self.info = server_info(self.url, self.api_key)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # uvicorn exits, `tarragon serve` shuts the cluster down
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the workers die with their parents (parent-death signal)
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)

    def heal(self, timeout: float = 180.0) -> None:
        """Wait until the cluster is back to its size at start (after a fault's replacement)."""
        wait_healthy(self.url, self.roles, timeout, self.proc, self.log.name)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_servers(argvs: dict[str, list[str]]) -> dict[str, Server]:
    """Several servers started side by side (their start-ups overlap), each ready on return."""
    servers: dict[str, Server] = {}
    try:
        for name, argv in argvs.items():
            servers[name] = Server(argv, wait=False)
        for srv in servers.values():
            srv.wait_started()
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


def wait_healthy(base_url: str, roles: dict[str, int] | None = None, timeout: float = 180.0, proc=None, log: str = "") -> dict[str, int]:
    """Poll until /health says ok, no worker is starting and (if given) as many workers per role
    are ready as `roles` says; returns the ready workers per role."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log else ""
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{tail}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                workers = httpx.get(f"{base_url}/v1/cluster", timeout=10).json()["workers"]
                ready: dict[str, int] = {}
                for w in workers:
                    ready[w["role"]] = ready.get(w["role"], 0) + (w["state"] == WorkerState.READY)
                if not any(w["state"] == WorkerState.STARTING for w in workers) and (roles is None or all(ready.get(k, 0) >= n for k, n in roles.items())):
                    return ready
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} not healthy after {timeout:.0f} s")
        time.sleep(0.2)


def server_info(base_url: str, api_key: str | None = None) -> dict[str, Any]:
    """/v1/models' entry and /v1/cluster (vocabulary size, recovery policy), where there is one."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    info = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    r = httpx.get(f"{base_url}/v1/cluster", headers=headers, timeout=30)
    if r.status_code == 200:
        info.update({k: v for k, v in r.json().items() if k in ("vocab_size", "recovery", "shadows")})
    return info


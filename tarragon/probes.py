"""The driver's probes of attention workers that owe tokens (see `AttentionProbes`)."""

from __future__ import annotations

import zmq

from . import protocol as P
from .sockets import Context, make_socket, recv
from .vocabulary import Role, WorkerState


class AttentionProbes:
    """The driver's own evidence that an attention worker is gone. Heartbeats (1 s) would leave
    its streams stalled that long, and a host that vanishes sends no FIN to tell sooner: so an
    attention worker that owes tokens and has been quiet for `quiet_s` is probed on its liveness
    channel (answered by its liveness thread, even mid-step), and reported failed to the
    orchestrator once no answer came for `timeout_s`, which fences it and moves its requests."""

    def __init__(self, ctx: Context, quiet_s: float = 0.1, timeout_s: float = 0.3):
        self.ctx, self.quiet_s, self.timeout_s = ctx, quiet_s, timeout_s
        self.socks: dict[str, tuple[str, zmq.Socket]] = {}  # worker -> (its probe endpoint, our DEALER)
        self.heard: dict[str, float] = {}  # worker -> its last message or pong
        self.suspect: dict[str, float] = {}  # worker -> first unanswered probe
        self.sent: dict[str, float] = {}
        self.reported: set[str] = set()

    def heard_from(self, name: str, now: float) -> None:
        self.heard[name] = now
        self.suspect.pop(name, None)

    def sync(self, records: list[P.WorkerRecord], now: float) -> None:
        """Probe channels to the ready attention workers, closed for the others."""
        ready = {w.name: w.probe_endpoint for w in records if w.role == Role.ATTENTION and w.state == WorkerState.READY and w.probe_endpoint}
        for name in [n for n, (ep, _) in self.socks.items() if ready.get(n) != ep]:
            self.socks.pop(name)[1].close(0)
        for name, endpoint in ready.items():
            if name not in self.socks:
                self.socks[name] = (endpoint, make_socket(self.ctx, zmq.DEALER, connect=endpoint, identity="driver"))
                self.heard.setdefault(name, now)

    def check(self, owing: set[str], now: float) -> list[P.WorkerFailed]:
        """Reports on the workers in `owing` (each holds requests) that stopped answering."""
        failed = []
        for name in owing & self.socks.keys() - self.reported:
            sock = self.socks[name][1]
            while sock.poll(0):
                if recv(sock, (P.Pong,), "driver (probes)") is not None:
                    self.heard_from(name, now)
            if now - self.heard.get(name, now) < self.quiet_s:
                continue
            since = self.suspect.setdefault(name, now)
            if now - since >= self.timeout_s:
                self.reported.add(name)
                failed.append(P.WorkerFailed(name, "driver", f"no token and no answer to probes for {(now - since) * 1000:.0f} ms",
                                             (now - since) * 1000))
            elif now - self.sent.get(name, 0.0) >= self.quiet_s / 2:
                self.sent[name] = now
                try:
                    sock.send_multipart(P.encode(P.Probe(int(now * 1e6))), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        return failed

    def close(self) -> None:
        for _, sock in self.socks.values():
            sock.close(0)
        self.socks.clear()

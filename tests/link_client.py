"""A blocking client of an expert worker's local link (local_link.py), for tests that write to
it as another process of the cluster's user could: well framed, or not at all."""

from __future__ import annotations

import select
import socket

from tarragon import local_link
from tarragon import protocol as P


class LinkClient:
    def __init__(self, endpoint: str, name: str | None = "test"):
        """Connected to `endpoint`, introduced as `name` (None: no Hello)."""
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(5.0)
        self.s.connect(local_link.path_of(endpoint))
        if name is not None:
            self.send_multipart(P.encode(P.Hello(name)))

    def send_multipart(self, frames: list) -> None:
        self.send_raw(b"".join(bytes(b) for b in local_link.frame(frames)))

    def send_raw(self, data: bytes) -> None:
        self.s.sendall(data)

    def poll(self, timeout_ms: int) -> bool:
        """Whether anything (a reply, or EOF) arrives within the time."""
        return bool(select.select([self.s], [], [], timeout_ms / 1000)[0])

    def closed_by_peer(self, timeout_ms: int = 2000) -> bool:
        return self.poll(timeout_ms) and self.s.recv(1 << 20) == b""

    def close(self) -> None:
        self.s.close()

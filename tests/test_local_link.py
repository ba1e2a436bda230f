"""Local links (tarragon/local_link.py) on their own: messages cut anywhere by the socket come out
whole, large messages cross both ways at once from one thread without either side blocking, and
an expert worker's end names each caller by its Hello."""

from __future__ import annotations

import random
import socket
import time

import zmq

from tarragon import local_link
from tarragon import protocol as P
from tarragon.local_link import Link, Listener


def pair() -> tuple[zmq.Poller, Link, Link]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    poller = zmq.Poller()
    return poller, Link(poller, "a", "b", sock=a), Link(poller, "b", "a", sock=b)


def pump(poller: zmq.Poller, links: list[Link], want: int, timeout_s: float = 10.0) -> list[list[list[bytes]]]:
    """Poll until `want` messages in all have arrived; each link's messages, as bytes."""
    got: list[list[list[bytes]]] = [[] for _ in links]
    by_fd = {link.fd: i for i, link in enumerate(links)}
    deadline = time.monotonic() + timeout_s
    while sum(map(len, got)) < want:
        assert time.monotonic() < deadline, f"{sum(map(len, got))} of {want} messages"
        for fd, flags in poller.poll(100):
            i = by_fd[fd]
            got[i] += [[bytes(f) for f in frames] for frames in links[i].service(flags)]
    return got


def test_large_messages_cross_both_ways_from_one_thread():
    """Each side sends 24 MiB before reading anything (more than both socket buffers hold): the
    sends return at once and the rest goes out as the peer reads, so neither blocks the other
    (blocking sends deadlock here)."""
    poller, a, b = pair()
    big_a, big_b = random.Random(1).randbytes(24 << 20), random.Random(2).randbytes(24 << 20)
    t0 = time.monotonic()
    a.send_multipart([b"from a", big_a, b""])
    b.send_multipart([b"from b", big_b])
    assert time.monotonic() - t0 < 1.0 and a.out and b.out  # owed, not blocked on
    got_a, got_b = pump(poller, [a, b], 2)
    assert got_a == [[b"from b", big_b]] and got_b == [[b"from a", big_a, b""]]
    assert not a.out and not b.out


def test_messages_cut_anywhere_come_out_whole():
    """Many messages, small and over the read buffer, written in random pieces: each comes out
    once, whole and in order."""
    rng = random.Random(7)
    msgs = [[rng.randbytes(rng.choice([0, 1, 100, 5000, local_link.CHUNK + 3, 3 * local_link.CHUNK])) for _ in range(rng.randint(1, 3))]
            for _ in range(60)]
    wire = b"".join(bytes(b) for m in msgs for b in local_link.frame(m))
    raw, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    poller = zmq.Poller()
    link = Link(poller, "reader", "writer", sock=theirs)
    raw.setblocking(False)
    got: list[list[bytes]] = []
    pos = 0
    while pos < len(wire):
        try:
            pos += raw.send(wire[pos : pos + rng.choice([1, 7, 8, 13, 4096, 70_000, 1 << 20])])
        except BlockingIOError:  # the socket is full: read
            pass
        got += [[bytes(f) for f in frames] for frames in link.service(zmq.POLLIN)]
    for _ in range(100):  # (what is still in the socket)
        got += [[bytes(f) for f in frames] for frames in link.service(zmq.POLLIN)]
    assert got == msgs
    raw.close()
    assert link.service(zmq.POLLIN) == [] and link.closed  # the writer's close is EOF


def test_a_listener_answers_each_caller_by_its_hello(tmp_path):
    endpoint = f"ipc://{tmp_path}/ew.sock"
    poller = zmq.Poller()
    listener = Listener(endpoint, poller, "ew")
    callers = {name: local_link.connect(endpoint, name, zmq.Poller(), "ew") for name in ("aw0", "aw1")}
    frames = P.encode(P.Probe(1))
    for link in callers.values():
        link.send_multipart(frames)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        got += listener.receive(dict(poller.poll(100)), (P.Probe,), None)
    assert sorted(m.sender for m in got) == ["aw0", "aw1"]
    for m in got:
        listener.send(m.identity, P.encode(P.Pong(int(m.sender[-1]))))
    for name, link in callers.items():
        deadline = time.monotonic() + 5
        replies = []
        while not replies and time.monotonic() < deadline:
            if link.poller.poll(100):
                replies = link.read()
        assert [P.decode(r)[0] for r in replies] == [P.Pong(int(name[-1]))]
    callers["aw0"].close()  # its end's EOF: forgotten
    deadline = time.monotonic() + 5
    while b"aw0" in listener.named and time.monotonic() < deadline:
        listener.receive(dict(poller.poll(100)), (P.Probe,), None)
    assert set(listener.named) == {b"aw1"}
    listener.close()

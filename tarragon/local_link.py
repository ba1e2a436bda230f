"""Local links: the datapath between an attention worker and an expert worker on one host.

The same messages as on every other channel (a typed header, then raw tensor frames: see
protocol.py), carried over a plain Unix-domain stream socket rather than ZeroMQ. Why: a ZeroMQ
message crosses an I/O thread on each side, so every hop wakes three threads; on a 2-core VM a
small round trip takes 60-180 us over ZeroMQ ipc:// and 16-55 us over a Unix socket, and a
decode step makes two round trips per layer (bench/step_timeline.py shows the trips). ZeroMQ
stays for tcp:// (other hosts: CURVE, heartbeats) and for every control channel.

Wire: each message is `u32 size | u32 n | n x u32 frame length | the n frames` (little-endian;
`size` counts every byte after itself). The caller's first message is `Hello(worker)`: the expert
worker answers and fences by that name, as it does by a ZMQ socket's identity.

Neither end ever blocks: a send the socket cannot take at once is kept and finished when the
socket becomes writable (the owner's poll loop calls `Link.service`), so two peers sending each
other large messages do not deadlock, and a stopped peer never stalls the process calling it.
A size or frame table that makes no sense ends the connection (logged; the peer reads EOF);
a bad message inside good framing is for the receiver to validate and drop, as on any socket.
The peer's exit is seen as EOF at once: the evidence ZMQ's disconnect monitor gives elsewhere.

Endpoints keep ZeroMQ's spelling, ipc://PATH, in the run folder, which is 0700: only processes
of the same user can connect.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections import deque
from itertools import islice

import zmq

from . import protocol as P
from .sockets import DATA_MAX_BYTES, Received, drops, validate

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<II")  # size, number of frames
MAX_FRAMES = 8  # a message has a header and at most two tensors
CHUNK = 1 << 18  # bytes a link reads at a time; a larger message gets a buffer of its own
SOCKET_BUFFER = 4 << 20  # SO_SNDBUF / SO_RCVBUF: most messages go out in one send
MAX_NAME = 256
# How long a datapath wait polls before it sleeps (`poll_spinning`): the attention worker's for
# replies, and an expert worker's for the next call of a batch it serves alone. Only while no
# other task waits for a CPU (procfs.CpuDemand): polling takes the time that a replacement worker
# loads in (at SCHED_IDLE), and that every process on a busy machine wants. TARRAGON_SPIN_US=0: never.
SPIN_S = float(os.environ.get("TARRAGON_SPIN_US", "300")) / 1e6
POLLIN, POLLOUT, POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)  # plain ints: pyzmq's flags are
# Python enums, whose every `|` and `&` runs Python code (a few per message)


def poll_spinning(poller: zmq.Poller, spin_until: float, timeout_ms: float | None) -> list:
    """Poll; until `spin_until` (perf_counter), without sleeping. On the datapath the next
    message usually comes within a few hundred microseconds, and sleeping for it costs more than
    that here: this process's CPU halts, and waking it again (the hypervisor's work, in a VM)
    takes 20-50 us and leaves it slower for a while after (an attention worker alone, sleeping
    300 us four times a step, needs 1.7x the CPU time for its step). Each turn yields, so that a
    process woken onto this CPU runs at once."""
    while time.perf_counter() < spin_until:
        if events := poller.poll(0):
            return events
        os.sched_yield()
    return poller.poll(timeout=timeout_ms)


def is_local(endpoint: str) -> bool:
    """Whether an expert worker's datapath endpoint is served by a local link (else ZeroMQ)."""
    return endpoint.startswith("ipc://")


def path_of(endpoint: str) -> str:
    return endpoint.removeprefix("ipc://")


def frame(frames: list) -> list[memoryview]:
    """A message's bytes on the wire: its header (sizes) then the frames, as buffers."""
    views = [memoryview(f).cast("B") for f in frames]
    lens = [v.nbytes for v in views]
    head = _HEAD.pack(4 + 4 * len(lens) + sum(lens), len(lens)) + struct.pack(f"<{len(lens)}I", *lens)
    return [memoryview(head), *(v for v in views if v.nbytes)]


def _hello(frames: list) -> P.Msg | str:
    try:
        return P.decode(frames)[0]
    except P.BadMessage as e:
        return str(e)


class Link:
    """One connection, registered (by its file descriptor) in its owner's zmq.Poller once
    connected. The calling side's link may be made before its peer listens (workers start in
    parallel): what it sends waits until `try_connect` succeeds, as on a ZMQ socket."""

    def __init__(self, poller: zmq.Poller, where: str, peer: str = "", sock: socket.socket | None = None, path: str = ""):
        """`peer` "": an accepted link, whose first message must be the caller's Hello."""
        self.poller, self.where, self.peer, self.path = poller, where, peer, path
        self.sock: socket.socket | None = None
        self.fd = -1
        self.out: deque[memoryview] = deque()  # what the socket has not taken yet
        self.buf, self.have = bytearray(CHUNK), 0  # bytes read, not yet returned as messages
        self.closed = False
        self.flags = POLLIN
        self.peer_pid = 0  # the process at the other end (Linux, once connected; 0: unknown)
        if sock is not None:
            self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self.sock, self.fd = sock, sock.fileno()
        if hasattr(socket, "SO_PEERCRED"):  # (pid, uid, gid) of the peer, from the kernel
            self.peer_pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        self.poller.register(self.fd, self.flags)
        self._flush()

    def try_connect(self) -> bool:
        """Connect if the peer listens by now (at once: a Unix socket never waits for a SYN)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(self.path)
        except OSError:  # not there yet, or its backlog is full: tried again later
            s.close()
            return False
        self._attach(s)
        return True

    # ---- sending ---------------------------------------------------------------------------

    def send_multipart(self, frames: list, copy: bool = False) -> None:
        """Queue one message and send what the socket takes now (a ZMQ socket's call; the
        frames' buffers are kept, not copied, until sent)."""
        if not self.closed:
            self.out.extend(frame(frames))
            if self.sock is not None:
                self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        while self.out:
            try:
                sent = self.sock.sendmsg(self.out if len(self.out) <= 512 else list(islice(self.out, 512)))
            except BlockingIOError:
                break
            except OSError:  # the peer is gone: `read` returns its EOF
                self.out.clear()
                break
            while sent:
                head = self.out[0]
                if head.nbytes > sent:
                    self.out[0], sent = head[sent:], 0
                else:
                    sent -= head.nbytes
                    self.out.popleft()
        flags = POLLIN | POLLOUT if self.out else POLLIN  # wake when writable only while owing bytes
        if flags != self.flags:
            self.flags = flags
            self.poller.modify(self.fd, flags)

    # ---- receiving -------------------------------------------------------------------------

    def service(self, events: int) -> list[list[memoryview]]:
        """What the poller reported: send what is owed, read what came. The messages received,
        each its list of frames; `closed` once the connection has ended."""
        if events & POLLOUT:
            self._flush()
        return self.read() if events & (POLLIN | POLLERR) else []

    def read(self) -> list[list[memoryview]]:
        msgs: list[list[memoryview]] = []
        while not self.closed and self.sock is not None:
            space = len(self.buf) - self.have
            try:
                n = self.sock.recv_into(memoryview(self.buf)[self.have :])
            except BlockingIOError:
                break
            except OSError:
                n = 0
            if n == 0:
                self.close()
                break
            self.have += n
            if not self._parse(msgs):
                self.close()
                break
            if n < space:  # the socket had no more
                break
        return msgs

    def _parse(self, msgs: list) -> bool:
        """Move the complete messages in the buffer to `msgs`; False if the framing is bad."""
        pos, buf = 0, self.buf
        while self.have - pos >= _HEAD.size:
            size, n = _HEAD.unpack_from(buf, pos)
            if size > DATA_MAX_BYTES or not 0 < n <= MAX_FRAMES or size < 4 + 4 * n:
                drops.note(self.where, self.peer, f"bad framing (size {size}, {n} frames): connection closed")
                return False
            end = pos + 4 + size
            if self.have < end:
                break
            lens = struct.unpack_from(f"<{n}I", buf, pos + _HEAD.size)
            start = pos + _HEAD.size + 4 * n
            if sum(lens) != end - start:
                drops.note(self.where, self.peer, "frame lengths do not add up: connection closed")
                return False
            if len(buf) > CHUNK:  # a large message, alone in a buffer of its own: handed over
                body, self.buf = memoryview(buf)[start:end], bytearray(CHUNK)
            else:  # copied out: the buffer is reused
                body = memoryview(bytearray(memoryview(buf)[start:end]))
            frames, off = [], 0
            for length in lens:
                frames.append(body[off : off + length])
                off += length
            pos = end
            if self.peer:
                msgs.append(frames)
            elif isinstance(hello := _hello(frames), P.Hello) and 0 < len(hello.worker) <= MAX_NAME:
                self.peer = hello.worker
            else:
                what = hello if isinstance(hello, str) else type(hello).__name__
                drops.note(self.where, "", f"a link that did not start with Hello ({what}): connection closed")
                return False
        rest = self.have - pos
        if self.buf is buf and pos:
            memoryview(buf)[:rest] = memoryview(buf)[pos : self.have]  # (overlap-safe)
        self.have = rest if self.buf is buf else 0
        if self.have >= _HEAD.size:  # a message larger than the buffer gets a buffer its size
            need = 4 + _HEAD.unpack_from(self.buf)[0]
            if need > len(self.buf):
                big = bytearray(need)
                big[: self.have] = memoryview(self.buf)[: self.have]
                self.buf = big
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.out.clear()
            if self.sock is not None:
                self.poller.unregister(self.fd)
                self.sock.close()


def connect(endpoint: str, name: str, poller: zmq.Poller, peer: str) -> Link:
    """An attention worker's link to the expert worker `peer` at `endpoint`, introduced as
    `name`; connected now if it listens, else see `Link.try_connect`."""
    link = Link(poller, name, peer, path=path_of(endpoint))
    link.send_multipart(P.encode(P.Hello(name)))
    link.try_connect()
    return link


class Listener:
    """An expert worker's end: accepts attention workers' links, reads their requests, and
    sends each reply on the link of the worker that asked."""

    def __init__(self, endpoint: str, poller: zmq.Poller, where: str):
        path = path_of(endpoint)
        if os.path.exists(path):  # a previous process's socket file (ZMQ's bind does the same)
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.poller, self.where = poller, where
        self.fd = self.sock.fileno()
        poller.register(self.fd, POLLIN)
        self.links: dict[int, Link] = {}  # fd -> link
        self.named: dict[bytes, Link] = {}  # the caller's name (from its Hello) -> its link

    def receive(self, events: dict, accept: tuple[type, ...], check) -> list[Received]:
        """Every valid message that the poll's `events` ({fd or socket: flags}) brought in."""
        if self.fd in events:
            self._accept()
        got: list[Received] = []
        for fd, flags in events.items():
            link = self.links.get(fd) if isinstance(fd, int) else None
            if link is None:
                continue
            msgs = link.service(flags)
            name = link.peer.encode()
            if name and self.named.get(name) is not link:
                self.named[name] = link  # (it has said Hello)
            for frames in msgs:
                if (m := validate(frames, accept, self.where, name, check)) is not None:
                    got.append(m)
            if link.closed:
                self._forget(link)
        return got

    def send(self, identity: bytes, frames: list) -> None:
        """Reply to the caller named `identity`; dropped if its link is gone (as ZMQ's ROUTER does)."""
        link = self.named.get(identity)
        if link is not None:
            link.send_multipart(frames)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: the caller will retry
                log.warning("%s: accepting a link: %s", self.where, e)
                return
            link = Link(self.poller, self.where, sock=sock)
            self.links[link.fd] = link

    def _forget(self, link: Link) -> None:
        self.links.pop(link.fd, None)
        if self.named.get(link.peer.encode()) is link:
            del self.named[link.peer.encode()]

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.poller.unregister(self.fd)
        self.sock.close()

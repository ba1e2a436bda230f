"""Network hosts on one machine, for tests of silent node loss and partitions (no tarragon import).

`Net` makes a Linux bridge with the address 10.213.0.1/24 in this (the root) network namespace,
where the test's own process (the driver) lives, and one network namespace per host, each
joined to the bridge by a veth pair (10.213.0.11, .12, ...). Processes run on a host through
`ip netns exec`. Faults are traffic control on the veth pairs, so nothing is told:
- `cut(host)`: a `blackhole` qdisc on both ends of the host's veth pair: every packet to or from
  it vanishes (no FIN, no RST, no ICMP, the link stays up), as when a node loses power or its NIC;
- `partition(a, b)`: an htb qdisc whose u32 filters send the packets between a and b alone to a
  blackhole class, both ways; traffic to every other host flows;
- `heal(host)` / `heal()`: back to plain forwarding.
The kernel here has neither netem nor tc actions (gact) nor iptables/nft: blackhole qdiscs and
u32 classification are what works. No latency is added (that needs netem). `close()` kills every
process started through `popen` and removes every namespace and link made; `sweep()` removes those
left behind by a killed run (`tarragon-*`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

PREFIX = "tarragon-"
BRIDGE = f"{PREFIX}br"
SUBNET = "10.213.0"
DRIVER_IP = f"{SUBNET}.1"


def available() -> str | None:
    """Why network hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    return _kernel_can()


def _kernel_can() -> str | None:
    """Try once what the harness needs (a namespace, a veth pair, the blackhole and htb qdiscs,
    a u32 filter): a container without CAP_NET_ADMIN or a kernel without them says so here."""
    ns = f"{PREFIX}probe"
    sh("ip", "netns", "del", ns, check=False)
    steps = [("ip", "netns", "add", ns),
             ("ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"),
             ("ip", "-n", ns, "link", "set", "pa", "up"),
             ("tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", "handle", "1:", "htb"),
             ("tc", "-n", ns, "class", "add", "dev", "pa", "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit"),
             ("tc", "-n", ns, "qdisc", "add", "dev", "pa", "parent", "1:20", "blackhole"),
             ("tc", "-n", ns, "filter", "add", "dev", "pa", "parent", "1:", "protocol", "ip", "u32",
              "match", "ip", "dst", "10.213.0.2/32", "flowid", "1:20")]
    try:
        for step in steps:
            r = sh(*step, check=False)
            if r.returncode != 0:
                return f"`{' '.join(step)}` failed: {r.stderr.strip()[:200]}"
        return None
    finally:
        sh("ip", "netns", "del", ns, check=False)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def sweep() -> None:
    """Remove the namespaces and links of an earlier run that did not clean up (killed), and end
    the processes still inside those namespaces."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if ns.startswith(PREFIX):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            sh("ip", "link", "del", name, check=False)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through close()


class Net:
    """Hosts h1..hN on a bridge; "driver" is this namespace (the bridge's address)."""

    def __init__(self, hosts: int):
        sweep()
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _interrupt)  # `timeout` or CI ending the run: clean up all the same
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self.procs: list[subprocess.Popen] = []
        self.faults: set[str] = set()
        try:
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "addr", "add", f"{DRIVER_IP}/24", "dev", BRIDGE)
            sh("ip", "link", "set", BRIDGE, "up")
            for h in self.hosts:
                self._add_host(h)
        except BaseException:
            self.close()
            raise

    def _add_host(self, h: str) -> None:
        ns, outer, inner = self.ns(h), self.outer(h), self.inner(h)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "link", "set", outer, "master", BRIDGE)
        sh("ip", "link", "set", outer, "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.ip(h)}/24", "dev", inner)
        sh("ip", "-n", ns, "link", "set", inner, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    # ---- names -------------------------------------------------------------------------------

    def ns(self, h: str) -> str:
        return f"{PREFIX}{h}"

    def outer(self, h: str) -> str:  # the bridge's end of the host's veth pair
        return f"{PREFIX}v{h}"

    def inner(self, h: str) -> str:  # the host's end (its only interface but lo)
        return f"{PREFIX}p{h}"

    def ip(self, h: str) -> str:
        return DRIVER_IP if h == "driver" else f"{SUBNET}.{10 + int(h[1:])}"

    # ---- processes -----------------------------------------------------------------------------

    def popen(self, h: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` on host `h`; it is killed at `close()`."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(h), *argv], **kwargs)
        self.procs.append(p)
        return p

    # ---- faults --------------------------------------------------------------------------------

    def _tc(self, h: str, *args: str, check: bool = True) -> None:
        """tc on both ends of h's veth pair: the host's egress (inside its namespace) and the
        bridge's egress towards it."""
        sh("ip", "netns", "exec", self.ns(h), "tc", *[a.replace("DEV", self.inner(h)) for a in args], check=check)
        sh("tc", *[a.replace("DEV", self.outer(h)) for a in args], check=check)

    def cut(self, h: str) -> None:
        """Every packet to or from h is dropped, silently; the link stays up."""
        self._tc(h, "qdisc", "replace", "dev", "DEV", "root", "blackhole")
        self.faults.add(h)

    def partition(self, a: str, b: str) -> None:
        """Drop the packets between a and b (both ways) and only those. `a` is a namespace host;
        `b` may be "driver" (the root namespace)."""
        if a == "driver":
            a, b = b, a
        if a not in self.faults:  # the first partition of a: classes first, then a filter per peer
            self._tc(a, "qdisc", "replace", "dev", "DEV", "root", "handle", "1:", "htb", "default", "10")
            for cls in ("1:10", "1:20"):
                self._tc(a, "class", "replace", "dev", "DEV", "parent", "1:", "classid", cls, "htb", "rate", "100gbit")
            self._tc(a, "qdisc", "replace", "dev", "DEV", "parent", "1:20", "handle", "20:", "blackhole")
        # Leaving a (its own end): to b. Towards a (the bridge's end): from b.
        sh("ip", "netns", "exec", self.ns(a), "tc", "filter", "add", "dev", self.inner(a), "parent", "1:", "protocol", "ip",
           "prio", "1", "u32", "match", "ip", "dst", f"{self.ip(b)}/32", "flowid", "1:20")
        sh("tc", "filter", "add", "dev", self.outer(a), "parent", "1:", "protocol", "ip",
           "prio", "1", "u32", "match", "ip", "src", f"{self.ip(b)}/32", "flowid", "1:20")
        self.faults.add(a)

    def heal(self, h: str | None = None) -> None:
        """Undo every fault on h (every host when None)."""
        for host in [h] if h else list(self.faults):
            self._tc(host, "qdisc", "del", "dev", "DEV", "root", check=False)
            self.faults.discard(host)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for h in self.hosts:  # processes started inside by others (none expected): ended too
            for pid in sh("ip", "netns", "pids", self.ns(h), check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.05)
        for h in self.hosts:
            sh("ip", "netns", "del", self.ns(h), check=False)  # takes its veth pair with it
            sh("ip", "link", "del", self.outer(h), check=False)
        sh("ip", "link", "del", BRIDGE, check=False)

    def __enter__(self) -> "Net":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

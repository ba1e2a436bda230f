"""What is read from /proc: a process's identity (pid + start time, which outlives pid reuse),
its resident memory and CPU time, whether any task waits for a CPU, and the run folders of
drivers that were SIGKILLed (removed at the next start, since nothing else would)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def process_id(pid: int) -> str:
    """pid and start time: a process's identity even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid} {f.read().rsplit(')', 1)[-1].split()[19]}"
    except OSError:
        return f"{pid} ?"


def rss(pid: int) -> int:
    """Resident bytes of a process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuDemand:
    """Whether a CPU is to spare: the tasks running or waiting to run, machine-wide (the kernel's
    count in /proc/loadavg, the caller included), against its CPUs. Read with pread on a kept
    descriptor: ~1 us. Without /proc, always spare."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/proc/loadavg", os.O_RDONLY)
        except OSError:
            self.fd = -1
        self.cpus = os.cpu_count() or 1

    def spare(self) -> bool:
        if self.fd < 0:
            return True
        runnable = os.pread(self.fd, 128, 0).split()[3]  # b"running/total"
        return int(runnable[: runnable.index(b"/")]) <= self.cpus


def make_run_dir() -> Path:
    """A private (0700) folder for one driver's sockets, key and logs, marked with its owner."""
    remove_orphaned_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix="tarragon-"))
    (run_dir / "driver").write_text(process_id(os.getpid()))  # whose it is, for the clean-up below
    return run_dir


def remove_orphaned_run_dirs() -> None:
    """Run folders of drivers that were killed (SIGKILL leaves them) are removed at the next start."""
    for d in Path(tempfile.gettempdir()).glob("tarragon-*"):
        try:
            owner = (d / "driver").read_text()
        except OSError:
            continue  # not ours to judge (no marker: an older version's, or being created)
        if process_id(int(owner.split()[0])) != owner:
            shutil.rmtree(d, ignore_errors=True)

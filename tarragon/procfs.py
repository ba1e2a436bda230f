"""What the driver reads from /proc: a process's identity (pid + start time, which outlives pid
reuse), its resident memory and CPU time, and the run folders of drivers that were SIGKILLed (removed at the
next start, since nothing else would)."""

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

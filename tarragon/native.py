"""The project's C kernels (csrc/): each source built at first use with the machine's C compiler
(`cc`, or $CC) for this CPU (-march=native), into the cache folder, named by a hash of the
source, the compiler's flags and the CPU's model and flags: a cache folder shared by machines of
different CPUs never serves one the other's build. Callers load a library with `library()` and
fall back to torch where it raises (no compiler, a failed build).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .make_model import cache_dir

CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC"]


def _cpu_id() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def build(source: str) -> Path:
    """The shared library of csrc/`source` for this CPU, compiled now unless already in the cache."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc)")
    src = (CSRC / source).read_bytes()
    key = hashlib.sha256(src + " ".join([compiler, *FLAGS]).encode() + _cpu_id().encode()).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"{Path(source).stem}-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)  # workers starting together: each its own file, one rename wins
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, "-o", tmp, str(CSRC / source)], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


@functools.cache
def library(source: str) -> ctypes.CDLL:
    """csrc/`source`, built and loaded (OSError or SubprocessError where it cannot be)."""
    return ctypes.CDLL(str(build(source)))


def failure(e: Exception) -> str:
    """Why a build failed, for the log: the compiler's last words where it ran."""
    return e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else str(e)

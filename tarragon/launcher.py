"""Local launcher: every worker is its own OS process on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec


class LocalLauncher:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.run_dir / name}.sock"

    def probe_endpoint(self, name: str) -> str:
        return self.endpoint(f"{name}-probe")

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start(self, module: str, name: str, spec: msgspec.Struct, threads: int = 1) -> subprocess.Popen:
        """Start `python -m module SPEC_JSON`, its output going to `<run_dir>/<name>.log`."""
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        # Idle OpenMP threads sleep instead of spinning: workers take turns on the same cores.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with open(self.log_path(name), "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", module, msgspec.json.encode(spec).decode()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the driver, which shuts workers down in order
            )

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

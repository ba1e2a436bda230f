"""Local launcher: every worker is its own OS process on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec

from .worker import WorkerSpec


class LocalLauncher:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.run_dir / name}.sock"

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start(self, spec: WorkerSpec) -> subprocess.Popen:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(spec.threads)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with open(self.log_path(spec.name), "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "tarragon.worker", msgspec.json.encode(spec).decode()],
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

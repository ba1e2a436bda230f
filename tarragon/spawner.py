"""Where the driver starts the orchestrator from: one daemon thread that lives as long as the
process. A child gets its parent-death signal when the thread that forked it exits, so starting
it from the thread that created an LLM (a pool's thread, asyncio.to_thread) would kill it when
that thread ends."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any


class Spawner:
    """Runs `fn(*args)` on its own thread and returns the result (or raises its exception)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="tarragon-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, args, future = self.jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((fn, args, future))
        return future.result()


spawn = Spawner()

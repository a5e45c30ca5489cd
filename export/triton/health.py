"""The engine models' health watchdog (cpu engine model and the LLM-API cpu implementation share it).

Within `poll_s` of a TP worker's death: the engine cannot serve again (its TP group is broken), so every
running and waiting request ends with the reason, `down` makes the model answer new ones UNAVAILABLE,
and tritonserver gets SIGTERM: readiness goes false at once and the server exits, so an orchestrator
routes traffic elsewhere and restarts it (a python model cannot make Triton 2.51's readiness false any
other way). No Triton imports: the model passes its logger in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

HEALTH_POLL_S = 0.5  # how often the watchdog looks at the engine's worker processes


class EngineWatchdog:
    def __init__(self, engine: Any, log_error: Callable[[str], None], model: str = "tensorrt_llm",
                 poll_s: float = HEALTH_POLL_S) -> None:
        self.engine, self.log_error, self.model, self.poll_s = engine, log_error, model, poll_s
        self.down: str | None = None  # why the engine cannot serve, once it cannot
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-health", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            dead = self.engine.dead_ranks()
            if dead:
                rank, code = dead[0]
                self.go_down(f"engine is down: TP worker rank {rank} exited (code {code})")
                return

    def go_down(self, why: str) -> None:
        with self._lock:
            if self.down is not None:
                return
            self.down = why
        self.log_error(f"{self.model}: {why}; failing its requests and stopping tritonserver so that readiness "
                       f"goes false")
        self.engine.scheduler.close(why)  # running and waiting requests end with this error now
        parent = os.getppid()
        with contextlib.suppress(OSError), open(f"/proc/{parent}/comm") as f:
            if f.read().strip() == "tritonserver":
                os.kill(parent, signal.SIGTERM)

    def close(self) -> None:
        self._stopping.set()

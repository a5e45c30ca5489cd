"""Where step commands run: in this process (tp = pp = 1), or on tp*pp worker processes.

Workers are plain `subprocess.Popen([sys.executable, "-m", "export.runtime.worker", ...])`, never
`multiprocessing` (broken inside Triton's python-backend stub). Each gets the command on stdin
and answers on its own reply pipe; every rank answers every command, so a failure anywhere
surfaces at once, with the rank's log tail.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Protocol

from export.errors import ExportError
from export.mapping import Mapping
from export.runtime import wire
from export.runtime.steps import Exit, SlotSteps

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600.0
TMP_PREFIX = "export-runtime-"


def _clean_stale() -> None:
    """Remove rendezvous/log dirs of drivers that were killed outright (their pid is gone)."""
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        try:
            os.kill(int(d.name.removeprefix(TMP_PREFIX).split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


class Backend(Protocol):
    """What an `Engine` drives, whatever the runtime: `call` runs one step command (`steps.py`) on
    every rank and returns each rank's reply in rank order; `close` releases the ranks."""

    def call(self, cmd: Any) -> list[Any]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The whole model in this process; the fast, simple path."""

    def __init__(self, stepper: SlotSteps) -> None:
        self.stepper = stepper

    def call(self, cmd: Any) -> list[Any]:
        return [self.stepper.run(cmd)]

    def close(self) -> None:
        pass


def _kill(procs: list[subprocess.Popen], tmp: str) -> None:
    """Last resort (garbage collection, interpreter exit): no worker outlives its driver."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
    shutil.rmtree(tmp, ignore_errors=True)


class ProcessBackend:
    """tp*pp worker processes joined by torch.distributed; rank r = pp_rank * tp + tp_rank."""

    def __init__(self, source: Path, mapping: Mapping, dtype: str, *, threads: int = 1,
                 python: str | None = None) -> None:
        self.mapping = mapping
        _clean_stale()
        self.tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
        self.procs: list[subprocess.Popen] = []
        self.replies: list[int] = []
        self._finalizer = weakref.finalize(self, _kill, self.procs, self.tmp)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # collectives stay on loopback
        for rank in mapping.ranks():
            read_fd, write_fd = os.pipe()
            cmd = [python or sys.executable, "-m", "export.runtime.worker", "--source", str(source),
                   "--tp", str(mapping.tp), "--pp", str(mapping.pp), "--rank", str(rank), "--dtype", dtype,
                   "--init", os.path.join(self.tmp, "rendezvous"), "--reply-fd", str(write_fd),
                   "--parent", str(os.getpid()), "--threads", str(threads)]
            with open(self.log(rank), "wb") as log:
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=log,
                                                   pass_fds=(write_fd,), cwd=REPO, env=env))
            os.close(write_fd)
            self.replies.append(read_fd)
        try:
            self._gather(timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def log(self, rank: int) -> str:
        return os.path.join(self.tmp, f"rank{rank}.log")

    def _tail(self, rank: int, lines: int = 15) -> str:
        try:
            text = Path(self.log(rank)).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def _gather(self, timeout: float | None = None) -> list[Any]:
        """One reply from every rank; a rank that dies or reports an error raises ExportError."""
        out: dict[int, Any] = {}
        pending = {fd: rank for rank, fd in enumerate(self.replies)}
        waited = 0.0
        while pending:
            ready, _, _ = select.select(list(pending), [], [], 1.0)
            for fd in ready:
                rank = pending.pop(fd)
                try:
                    status, value = wire.recv(fd)
                except EOFError:
                    raise ExportError(f"runtime worker rank {rank} exited (code {self.procs[rank].poll()}):\n"
                                      f"{self._tail(rank)}") from None
                if status == "error":
                    raise ExportError(f"runtime worker {value}")
                out[rank] = value
            waited += 1.0 if not ready else 0.0
            dead = [r for r in pending.values() if self.procs[r].poll() is not None]
            if dead:
                raise ExportError(f"runtime worker rank {dead[0]} exited (code {self.procs[dead[0]].poll()}):\n"
                                  f"{self._tail(dead[0])}")
            if timeout is not None and waited > timeout:
                raise ExportError(f"runtime workers {sorted(pending.values())} did not answer in {timeout:.0f}s")
        return [out[r] for r in range(len(self.replies))]

    def call(self, cmd: Any) -> list[Any]:
        for rank, p in enumerate(self.procs):
            try:
                wire.send(p.stdin.fileno(), cmd)  # type: ignore[union-attr]
            except BrokenPipeError:
                raise ExportError(f"runtime worker rank {rank} is gone:\n{self._tail(rank)}") from None
        return self._gather()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    wire.send(p.stdin.fileno(), Exit())  # type: ignore[union-attr]
                    p.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fd in self.replies:
            os.close(fd)
        self.replies = []
        self._finalizer()

"""Run a real tritonserver on a model repository and stop it without leaving processes behind.

The server runs in its own process group (python-backend stubs and the engine's TP workers are
its descendants), so stopping it signals the whole group; a parent-death signal stops it even if
the launcher itself is killed. `start_server` returns only once every model is ready, or raises
with the server's own load error.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from export.errors import ExportError
from export.triton.binary import ServerBinary, find_tritonserver

log = logging.getLogger(__name__)
DEPLOY_FILE = "triton_deploy.json"   # written by `package`: flavour, world size, engine dir
ERROR_LINE = re.compile(r"^E\d{4} |failed to load|error:|Error|Traceback", re.IGNORECASE)
NOISE = re.compile(r"CudaDriverHelper|NVML|DCGM|cuda", re.IGNORECASE)  # a CPU host's expected complaints


class ServerError(ExportError):
    """tritonserver did not come up; the message carries its own load error."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    """A running tritonserver; a context manager that stops it (and its process group)."""

    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    work_dir: Path

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the group (models finalize, engines close their workers), SIGKILL what remains."""
        if self.alive():
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0fs; killing its process group", timeout)
        _signal_group(self.process.pid, signal.SIGKILL)  # stragglers (stubs, workers) in the group
        code = self.process.wait()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return code

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _die_with_parent() -> None:
    """preexec: new session (own process group) and SIGTERM when the launcher dies (Linux)."""
    os.setsid()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def read_deploy(repo: Path) -> dict:
    p = Path(repo) / DEPLOY_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def server_command(binary: ServerBinary, repo: Path, *, host: str, http_port: int, grpc_port: int,
                   metrics_port: int, world_size: int = 1) -> list[str]:
    """One tritonserver, or an MPMD mpirun with one server per rank (launch_triton_server.py's leader mode)."""
    def one(rank: int) -> list[str]:
        args = [str(binary.path), f"--model-repository={repo}", f"--http-address={host}",
                f"--http-port={http_port}", f"--grpc-address={host}", f"--grpc-port={grpc_port}",
                f"--metrics-address={host}", f"--metrics-port={metrics_port}",
                "--disable-auto-complete-config", "--exit-timeout-secs=10",
                f"--backend-config=python,shm-region-prefix-name=ffx{os.getpid()}{uuid.uuid4().hex[:6]}r{rank}_"]
        if binary.backend_dir is not None:
            args.append(f"--backend-directory={binary.backend_dir}")
        if rank > 0:
            args += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        return args
    if world_size == 1:
        return one(0)
    if binary.bundled:
        raise ExportError(f"a TensorRT-LLM engine with world size {world_size} needs NVIDIA's tritonserver "
                          f"(with mpirun); the bundled CPU server cannot run it")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise ExportError(f"world size {world_size} needs mpirun on PATH (one tritonserver per rank)")
    cmd = [mpirun, "--allow-run-as-root"]
    for r in range(world_size):
        cmd += (["-n", "1", *one(r), ":"])
    return cmd[:-1]


def start_server(repo: str | Path, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, timeout: float = 300.0) -> ServerHandle:
    """Start tritonserver on `repo` and wait until every model is ready; port 0 picks a free port."""
    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise ExportError(f"{repo}: no such model repository")
    _clean_stale_work_dirs()
    work_dir = Path(tempfile.mkdtemp(prefix=f"tritonserver-{os.getpid()}-"))
    binary = find_tritonserver(work_dir)
    ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
    deploy = read_deploy(repo)
    cmd = server_command(binary, repo, host=host, http_port=ports[0], grpc_port=ports[1],
                         metrics_port=ports[2], world_size=int(deploy.get("world_size", 1)))
    log_path = work_dir / "tritonserver.log"
    log.info("starting %s on %s (http %d, grpc %d, metrics %d)", binary.describe(), host, *ports)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=binary.env, cwd=work_dir,
                                preexec_fn=_die_with_parent)
    handle = ServerHandle(proc, host, *ports, log_path=log_path, work_dir=work_dir)
    try:
        wait_ready(handle, timeout)
    except BaseException:
        text = handle.log_text()
        handle.stop()
        _keep_log(text)
        raise
    return handle


def _clean_stale_work_dirs() -> None:
    """Work dirs (backend links, log) of launchers that were killed: their pid is gone."""
    for d in Path(tempfile.gettempdir()).glob("tritonserver-*-*"):
        try:
            pid = int(d.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def _keep_log(text: str) -> None:
    """The work dir is gone after a failed start; keep the full log where the user can read it."""
    path = Path(tempfile.gettempdir()) / f"tritonserver-failed-{os.getpid()}.log"
    path.write_text(text)
    log.error("full tritonserver log: %s", path)


def wait_ready(handle: ServerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise ServerError(f"tritonserver exited (code {handle.process.returncode}) before it was ready:\n"
                              f"{load_errors(handle.log_text())}")
        if _http_status(handle.host, handle.http_port, "/v2/health/ready") == 200:
            return
        time.sleep(0.25)
    raise ServerError(f"tritonserver not ready after {timeout:.0f}s:\n{load_errors(handle.log_text())}")


def _http_status(host: str, port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None


def load_errors(text: str, limit: int = 40) -> str:
    """The server's own error lines (model load failures, python tracebacks); else the log tail."""
    lines = text.splitlines()
    errors = [ln for ln in lines if ERROR_LINE.search(ln) and not NOISE.search(ln)]
    picked = errors if errors else lines
    return "\n".join(picked[-limit:])

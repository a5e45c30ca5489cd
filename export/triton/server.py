"""Run a real tritonserver on a model repository and stop it without leaving processes behind.

The server runs in its own process group (python-backend stubs and the engine's TP workers are
its descendants), so stopping it signals the whole group; a parent-death signal stops it even if
the launcher itself is killed. `start_server` returns only once every model is ready, or raises
with the server's own load error.

State on disk is private and is cleaned up: the server starts with umask 077 and the python
backend's shared-memory regions (which hold prompt text) are made 0600 once it is up; every region
carries this launcher's prefix (`ffx<launcher pid>x<random>r<rank>_`), so `stop` removes them and a
later `start_server` removes those of launchers that are gone (a `kill -9` leaves them behind). A
failed start keeps its log in a new 0600 file made by `mkstemp` (never an existing path or link).
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
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from export.errors import ExportError
from export.process import pid_alive
from export.triton.binary import EXPORT_ROOT, ServerBinary, find_tritonserver
from export.triton.reaper import READY, STOPPING

log = logging.getLogger(__name__)
DEPLOY_FILE = "triton_deploy.json"   # written by `package`: flavour, world size, engine dir
ERROR_LINE = re.compile(r"^E\d{4} |failed to load|error:|Error|Traceback", re.IGNORECASE)
NOISE = re.compile(r"CudaDriverHelper|NVML|DCGM|cuda", re.IGNORECASE)  # a CPU host's expected complaints
RUNTIME_TMP_PREFIX = "export-runtime-"  # = export.runtime.backends.TMP_PREFIX (not imported: that pulls in torch)
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "ffx"  # + launcher pid + "x" + random hex: python-backend shm regions of our servers


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
    shm_prefix: str = ""
    reaper: subprocess.Popen | None = None
    log_offset: int = 0  # where this run's output starts in log_path (a --log-file is appended to)

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
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the group (models finalize, engines close their workers), SIGKILL what remains,
        then remove what the tree left on disk (shm regions, the engines' /tmp/export-runtime-* dirs)."""
        from export.triton.procs import tree_pids

        pids = tree_pids(self.process.pid) if self.alive() else []
        with contextlib.suppress(OSError):
            (self.work_dir / STOPPING).touch()  # the reaper: this shutdown is asked for, not a dead stub
        if self.alive():
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0fs; killing its process group", timeout)
        _signal_group(self.process.pid, signal.SIGKILL)  # stragglers (stubs, workers) in the group
        code = self.process.wait()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        remove_shm(self.shm_prefix)
        _remove_runtime_dirs(pids)
        self._stop_reaper()
        return code

    def _stop_reaper(self) -> None:
        """The reaper exits by itself once the server is gone (after the same cleanup); wait for it."""
        if self.reaper is None:
            return
        try:
            self.reaper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.reaper.kill()
            self.reaper.wait()

    def shm_regions(self) -> list[Path]:
        """This server's python-backend shared-memory regions now."""
        return shm_regions(self.shm_prefix)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _remove_runtime_dirs(pids: list[int]) -> None:
    """The rendezvous/log dirs `export.runtime.backends` made in these (now stopped) processes."""
    for pid in pids:
        for d in Path(tempfile.gettempdir()).glob(f"{RUNTIME_TMP_PREFIX}{pid}-*"):
            shutil.rmtree(d, ignore_errors=True)


def shm_regions(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if prefix else []


def remove_shm(prefix: str) -> None:
    """Unlink the regions of a stopped server (the python backend leaves them after any unclean exit)."""
    for p in shm_regions(prefix):
        with contextlib.suppress(OSError):
            p.unlink()


def _private_shm(prefix: str) -> None:
    """0600 for the regions the python backend made (it sets 0644 itself whatever the umask)."""
    for p in shm_regions(prefix):
        with contextlib.suppress(OSError):
            p.chmod(0o600)


def _clean_stale_shm() -> None:
    """Regions left by servers whose launcher is gone (pid in the prefix no longer exists)."""
    for p in SHM_DIR.glob(f"{SHM_PREFIX}*x*"):
        try:
            pid = int(p.name[len(SHM_PREFIX):].split("x", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                p.unlink()


def _die_with_parent() -> None:
    """preexec: new session (own process group), SIGTERM when the launcher dies (Linux), and umask
    077 so what the server and its models create (shm regions, logs, temp dirs) is private."""
    os.setsid()
    os.umask(0o077)
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def read_deploy(repo: Path) -> dict:
    p = Path(repo) / DEPLOY_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def server_command(binary: ServerBinary, repo: Path, *, host: str, http_port: int, grpc_port: int,
                   metrics_port: int, world_size: int = 1, shm_prefix: str | None = None) -> list[str]:
    """One tritonserver, or an MPMD mpirun with one server per rank (launch_triton_server.py's leader mode)."""
    shm_prefix = shm_prefix or new_shm_prefix()
    def one(rank: int) -> list[str]:
        args = [str(binary.path), f"--model-repository={repo}", f"--http-address={host}",
                f"--http-port={http_port}", f"--grpc-address={host}", f"--grpc-port={grpc_port}",
                f"--metrics-address={host}", f"--metrics-port={metrics_port}",
                "--disable-auto-complete-config", "--exit-timeout-secs=10",
                f"--backend-config=python,shm-region-prefix-name={shm_prefix}r{rank}_"]
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


def new_shm_prefix() -> str:
    return f"{SHM_PREFIX}{os.getpid()}x{uuid.uuid4().hex[:6]}"


def start_server(repo: str | Path, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, timeout: float = 300.0, log_file: str | Path | None = None) -> ServerHandle:
    """Start tritonserver on `repo` and wait until every model is ready; port 0 picks a free port.

    Its output goes to `log_file` (appended to, created 0600, never through a symlink) when given,
    else to a file in its work dir that goes with it."""
    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise ExportError(f"{repo}: no such model repository")
    _clean_stale_work_dirs()
    _clean_stale_shm()
    work_dir = Path(tempfile.mkdtemp(prefix=f"tritonserver-{os.getpid()}-"))
    binary = find_tritonserver(work_dir)
    ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
    deploy = read_deploy(repo)
    prefix = new_shm_prefix()
    cmd = server_command(binary, repo, host=host, http_port=ports[0], grpc_port=ports[1],
                         metrics_port=ports[2], world_size=int(deploy.get("world_size", 1)), shm_prefix=prefix)
    log_path = Path(log_file).absolute() if log_file else work_dir / "tritonserver.log"
    log.info("starting %s on %s (http %d, grpc %d, metrics %d)", binary.describe(), host, *ports)
    with _open_log(log_path) as out:
        offset = out.tell()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=binary.env, cwd=work_dir,
                                preexec_fn=_die_with_parent)
    handle = ServerHandle(proc, host, *ports, log_path=log_path, work_dir=work_dir, shm_prefix=prefix,
                          reaper=_start_reaper(proc.pid, prefix, work_dir), log_offset=offset)
    try:
        wait_ready(handle, timeout)
        _private_shm(prefix)  # before any request can put a prompt there
        (work_dir / READY).touch()  # the reaper watches the stubs from now on
    except BaseException:
        text = handle.log_text()
        handle.stop()
        _keep_log(text)
        raise
    return handle


def _open_log(path: Path) -> BinaryIO:
    """Append-only, never following a planted symlink; a new file is 0600 (it holds request errors)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise ExportError(f"{path}: cannot write the server log there ({e.strerror})") from None
    return os.fdopen(fd, "ab")


def _start_reaper(server: int, shm_prefix: str, work_dir: Path) -> subprocess.Popen:
    """`export.triton.reaper` in its own session: it cleans up after a kill -9 of the launcher, of the
    server or of a stub (see its module doc)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(EXPORT_ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "export.triton.reaper", "--server", str(server), "--launcher", str(os.getpid()),
           "--shm-prefix", shm_prefix, "--work-dir", str(work_dir)]
    return subprocess.Popen(cmd, cwd=EXPORT_ROOT, env=env, start_new_session=True, stdin=subprocess.DEVNULL)


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


def _keep_log(text: str) -> Path:
    """The work dir is gone after a failed start; keep the full log where the user can read it.

    A new file by mkstemp (O_CREAT | O_EXCL, mode 0600): a planted file or symlink at a predictable
    name cannot make the launcher (often root) overwrite another file."""
    fd, name = tempfile.mkstemp(prefix="tritonserver-failed-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    log.error("full tritonserver log: %s", name)
    return Path(name)


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

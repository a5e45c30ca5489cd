"""Faults an operator meets (issue 15): killed processes, leftovers on disk, planted files.

Tests that kill a process start their own server; each is bounded in time and checks that no
process of the tree and no shared-memory region of it is left.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from export.triton import server as srv


def test_the_failure_log_never_follows_a_planted_symlink(tmp_path, monkeypatch):
    """The log of a failed start went to /tmp/tritonserver-failed-<pid>.log with a plain write: a
    symlink planted there made the launcher (often root) overwrite its target."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f"tritonserver-failed-{os.getpid()}.log").symlink_to(victim)
    path = srv._keep_log("E0101 model failed to load")
    assert victim.read_text() == "precious"
    assert path.parent == tmp_path and not path.is_symlink()
    assert path.read_text() == "E0101 model failed to load"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_stale_shm_regions_of_a_dead_launcher_are_removed(tmp_path, monkeypatch):
    """Regions carry the launcher's pid; those of a launcher that is gone go at the next start,
    those of a live one (another server on this host) stay."""
    monkeypatch.setattr(srv, "SHM_DIR", tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    gone = tmp_path / f"ffx{dead}xab12cdr0_python_backend_shm"
    mine = tmp_path / f"ffx{os.getpid()}xab12cdr0_python_backend_shm"
    other = tmp_path / "someone_elses_region"
    for p in (gone, mine, other):
        p.write_bytes(b"prompt text")
    srv._clean_stale_shm()
    assert not gone.exists() and mine.exists() and other.exists()


def test_the_reaper_stays_light():
    """The reaper must act within a poll, not after importing torch (seconds on a busy host)."""
    from export.runtime.backends import TMP_PREFIX

    assert srv.RUNTIME_TMP_PREFIX == TMP_PREFIX
    code = "import sys, export.triton.reaper, export.triton.server, export.triton.procs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False", out.stderr


def test_server_command_uses_the_launchers_shm_prefix(tmp_path):
    binary = srv.ServerBinary(Path("/x/tritonserver"), bundled=True, backend_dir=tmp_path)
    cmd = srv.server_command(binary, tmp_path, host="127.0.0.1", http_port=1, grpc_port=2, metrics_port=3,
                             shm_prefix="ffx1x000000")
    assert "--backend-config=python,shm-region-prefix-name=ffx1x000000r0_" in cmd
    assert srv.new_shm_prefix().startswith(f"ffx{os.getpid()}x")


# ---- killed processes: each test has its own server ------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from triton_support import make_engine_dir

    from export.triton.package import package_repo

    root = tmp_path_factory.mktemp("faults")
    return package_repo(make_engine_dir(root, tp=2), root / "repo", backend="cpu")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def leftovers(pids: list[int], prefix: str, timeout: float = 15.0) -> tuple[list[int], list[str]]:
    """Processes of `pids` still alive and shm regions with `prefix` still there after `timeout` (or sooner)."""
    from export.triton.reaper import alive

    deadline = time.monotonic() + timeout
    while True:
        procs = [p for p in pids if alive(p)]
        regions = [p.name for p in srv.SHM_DIR.glob(f"{prefix}*")]
        if not (procs or regions) or time.monotonic() > deadline:
            return [f"{p} {cmdline(p)[:120]}" for p in procs], regions  # type: ignore[return-value]
        time.sleep(0.1)


def ready(server) -> int | None:
    return srv._http_status(server.host, server.http_port, "/v2/health/ready")


def wait_not_ready(server, timeout: float) -> float:
    start = time.monotonic()
    while ready(server) == 200:
        assert time.monotonic() - start < timeout, f"/v2/health/ready still 200 after {timeout:.0f}s"
        time.sleep(0.05)
    return time.monotonic() - start


def stream_in_thread(server, model: str, out: dict) -> threading.Thread:
    """A 200-token stream; `out[model]` gets (error text or None, seconds from send to the end)."""
    from export.triton.client import QueryError, Request, query

    started = out.setdefault("started", threading.Event())

    def run() -> None:
        t = time.monotonic()
        try:
            query(Request("the quick brown fox", max_tokens=200), url=server.grpc_url, model=model, timeout=60,
                  on_text=lambda s: started.set())
            out[model] = (None, time.monotonic())
        except QueryError as e:
            out[model] = (str(e), time.monotonic())
        out[f"{model} sent"] = t

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_dead_tp_worker_ends_streams_with_an_error_and_readiness_goes_false(repo):
    """kill -9 of TP rank 1 mid-stream: the BLS stream hung forever (its thread leaked, shutdown waited
    out the 10 s exit timeout) and /v2/health/ready stayed 200 while every request failed."""
    from export.triton.procs import tree_pids

    server = srv.start_server(repo, timeout=240)
    try:
        out: dict = {}
        threads = [stream_in_thread(server, m, out) for m in ("tensorrt_llm_bls", "ensemble")]
        assert out["started"].wait(60), "no stream started"
        tree = tree_pids(server.process.pid)
        (rank1,) = [p for p in tree if "export.runtime.worker" in cmdline(p) and "--rank 1 " in cmdline(p)]
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(timeout=15)
        for model in ("tensorrt_llm_bls", "ensemble"):
            err, ended = out[model]
            assert err is not None and re.search(r"rank 1 (exited|is gone)|engine is down", err), (model, err)
            assert ended - killed < 5, f"{model}: the error came {ended - killed:.1f}s after the kill"
        wait_not_ready(server, timeout=5)
        server.process.wait(timeout=15)  # the engine model stopped the server: an orchestrator restarts it
        assert server.process.returncode == 0, "a request outlived the shutdown (exit timeout)"
        assert "engine is down: TP worker rank 1 exited" in server.log_text()
        assert leftovers(tree, server.shm_prefix) == ([], [])
    finally:
        server.stop()


@pytest.mark.slow
def test_a_dead_engine_stub_makes_the_server_not_ready(repo):
    """kill -9 of the tensorrt_llm model's stub: Triton 2.51 answered "Stub process is not healthy" to
    every request and kept /v2/health/ready at 200; the reaper now stops the server."""
    from export.triton.procs import tree_pids

    server = srv.start_server(repo, timeout=240)
    try:
        tree = tree_pids(server.process.pid)
        (stub,) = [p for p in tree if "/tensorrt_llm/1/model.py" in cmdline(p)]
        before = set(Path(tempfile.gettempdir()).glob("tritonserver-failed-*.log"))
        os.kill(stub, signal.SIGKILL)
        wait_not_ready(server, timeout=5)
        assert leftovers(tree, server.shm_prefix) == ([], [])
        server.reaper.wait(timeout=20)
        kept = set(Path(tempfile.gettempdir()).glob("tritonserver-failed-*.log")) - before
        assert len(kept) == 1 and "tensorrt_llm" in kept.pop().read_text()  # the death can be diagnosed
    finally:
        server.stop()


@pytest.mark.slow
def test_a_killed_server_leaves_no_stub_worker_or_shm_region(repo):
    """kill -9 of tritonserver orphaned its python stubs and the TP workers, and left its shm regions."""
    from export.triton.procs import tree_pids

    server = srv.start_server(repo, timeout=240)
    try:
        tree = tree_pids(server.process.pid)
        assert len(tree) >= 7  # server, 4 stubs, 2 TP workers
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        assert leftovers(tree, server.shm_prefix) == ([], [])  # the reaper, without the launcher's stop()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_killed_launcher_leaves_nothing_behind(repo):
    """kill -9 of `serve`: the engine stub deadlocked in its shutdown and it and both TP workers stayed
    for minutes (sometimes tritonserver too), and the shm regions leaked."""
    from export.triton.procs import tree_pids

    root = Path(__file__).resolve().parent.parent
    serve = subprocess.Popen([sys.executable, "-m", "export", "serve", str(repo)], cwd=root, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert "tritonserver ready" in serve.stdout.readline()
        tree = tree_pids(serve.pid)
        assert len(tree) >= 9  # serve, reaper, server, 4 stubs, 2 TP workers
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait()
        assert leftovers(tree, f"{srv.SHM_PREFIX}{serve.pid}x") == ([], [])
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()

"""The server's reaper: `python -m export.triton.reaper ...`, started by `start_server` (never by hand).

A small process in a session of its own, so that whatever kills the launcher or the server (kill -9
included, which no cleanup handler sees) leaves no process of the server's tree and none of its state
behind. Every POLL_S it looks at the launcher, tritonserver and the server's python stubs:

- the launcher is gone (`serve` killed): SIGTERM the server's process group, SIGKILL it after GRACE_S
  (tritonserver's own exit timeout is 10 s; a stub stuck in `finalize` does not hold it longer);
- tritonserver is gone (killed, crashed): SIGKILL its group, i.e. the python stubs and TP workers it
  orphaned;
- a python stub died (killed, crashed) while the server was not stopping: Triton 2.51 keeps reporting
  that model ready and answers every request with "Stub process is not healthy", so the reaper
  SIGTERMs the server: readiness goes false and the server exits, for an orchestrator to restart it.

Then it removes the server's shared-memory regions, its work dir and the engines' export-runtime dirs
of every process it saw in the tree, and exits. The launcher marks a stop it asked for by creating
STOPPING in the work dir, so its own shutdown is not mistaken for a dead stub, and READY once the
server is up: only stubs seen after that count (the python backend starts short-lived ones while
models load).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.25
GRACE_S = 11.0
STOPPING = "STOPPING"  # created in the work dir by ServerHandle.stop
READY = "READY"  # ... by start_server once every model is ready (stubs come and go while models load)
STUB_COMM = "triton_python_b"  # /proc/PID/comm of triton_python_backend_stub (15 characters)


def state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z")


def stubs(server: int, tree: list[int]) -> set[int]:
    """The server's python-backend stubs among `tree`."""
    out = set()
    for pid in tree:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == STUB_COMM:
                out.add(pid)
        except OSError:
            continue
    out.discard(server)
    return out


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def clean(args: argparse.Namespace, seen: set[int]) -> None:
    """What the tree left on disk: shm regions, the engines' export-runtime dirs, and the work dir
    unless the launcher is alive: it still reads the server's log there (why the server went) and
    removes the dir in its own `stop()`; a launcher that dies leaves it to the next start's sweep."""
    from export.triton.server import _remove_runtime_dirs, remove_shm

    remove_shm(args.shm_prefix)
    _remove_runtime_dirs(sorted(seen))
    if not alive(args.launcher):
        shutil.rmtree(args.work_dir, ignore_errors=True)


def watch(args: argparse.Namespace) -> str:
    """Poll until the server's tree must go; returns why."""
    from export.triton.procs import tree_pids

    seen: set[int] = set()
    known_stubs: set[int] = set()
    work = Path(args.work_dir)
    stopping = False
    while True:
        # read before the server's state: the launcher removes the work dir once the server is gone
        stopping = stopping or (work / STOPPING).exists() or not work.exists()
        if os.getppid() != args.launcher or not alive(args.launcher):
            return "launcher gone"
        if not alive(args.server):
            return "server gone"
        tree = tree_pids(args.server)
        seen.update(tree)
        died = {p for p in known_stubs if not alive(p)}
        if died and not stopping and alive(args.server):
            return f"python stub {min(died)} died"
        if (work / READY).exists():
            known_stubs |= stubs(args.server, tree)
        args.seen = seen
        time.sleep(POLL_S)


def keep_log(work: Path) -> None:
    """A stub died: keep the server's log (the stub's faulthandler traceback, the backend's last
    words) before the work dir goes, so the death can be diagnosed."""
    from export.triton.server import _keep_log

    log = work / "tritonserver.log"
    if log.is_file():
        name = _keep_log(log.read_text(errors="replace"))
        print(f"reaper: the server's log is kept in {name}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.triton.reaper")
    p.add_argument("--server", type=int, required=True, help="tritonserver's pid (= its process group)")
    p.add_argument("--launcher", type=int, required=True)
    p.add_argument("--shm-prefix", required=True)
    p.add_argument("--work-dir", required=True)
    args = p.parse_args(argv)
    args.seen = set()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the launcher's terminal is the launcher's to handle
    why = watch(args)
    if why != "server gone":
        print(f"reaper: {why}; stopping tritonserver {args.server}", file=sys.stderr, flush=True)
        if why.endswith("died"):  # before the stop: the launcher removes the work dir once the server is gone
            keep_log(Path(args.work_dir))
        kill_group(args.server, signal.SIGTERM)
        wait_gone(args.server, GRACE_S)
    kill_group(args.server, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in args.seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    clean(args, args.seen | {args.server})
    return 0


if __name__ == "__main__":
    sys.exit(main())

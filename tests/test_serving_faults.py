"""Faults an operator meets (issue 15): killed processes, leftovers on disk, planted files.

Tests that kill a process start their own server; each is bounded in time and checks that no
process of the tree and no shared-memory region of it is left.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

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


def test_server_command_uses_the_launchers_shm_prefix(tmp_path):
    binary = srv.ServerBinary(Path("/x/tritonserver"), bundled=True, backend_dir=tmp_path)
    cmd = srv.server_command(binary, tmp_path, host="127.0.0.1", http_port=1, grpc_port=2, metrics_port=3,
                             shm_prefix="ffx1x000000")
    assert "--backend-config=python,shm-region-prefix-name=ffx1x000000r0_" in cmd
    assert srv.new_shm_prefix().startswith(f"ffx{os.getpid()}x")

"""Whether a process exists: shared by the output policy (stale temp dirs) and the server launcher
(stale work dirs and shared-memory regions of launchers that were killed)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while `pid` exists (a zombie counts: its parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True

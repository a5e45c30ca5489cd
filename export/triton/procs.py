"""Resident memory of a process tree (tritonserver, its python stubs, the engine's TP workers), from /proc."""

from __future__ import annotations

import os
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process now (this kernel has no /proc/PID/task/*/children)."""
    out: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after "(comm) state"
    return out


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants alive now."""
    kids: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        kids.setdefault(parent, []).append(child)
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += kids.get(p, [])
    return seen


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0  # the process exited meanwhile


def tree_rss_bytes(pid: int) -> int:
    """Sum of resident set sizes over the tree (shared pages count once per process: an upper bound)."""
    return sum(rss_bytes(p) for p in tree_pids(pid))

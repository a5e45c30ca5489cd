"""The one output policy of every command that writes: never destroy what we did not create.

- A new output is written into a hidden temporary sibling (`.NAME.tmp-PID-START-TAG`) and renamed
  into place when complete, so a failed or killed run never leaves a half output under its name.
- An existing output is replaced only if it is ours (it holds the `.ffn-export` marker this module
  writes into every output, or it is recognisably an output made before the marker existed) *and*
  the caller asked for it (`--overwrite`). Anything else at that path (a user's directory, a file)
  is refused, before any expensive work: `check_output` runs in the commands' validation phase and
  again when the output is opened.
- An output never is, lies inside or contains one of its inputs (compared as resolved real paths):
  `--out` naming the source checkpoint or its parent would otherwise replace the source.
- Free space is checked against the planned size first; running out of space anyway (ENOSPC) is
  one clear error, and the temporary directory is removed.
- Temporary directories left by killed runs are removed by the next run writing beside them, and
  by `python -m export clean PATH`. Only directories with our name pattern and marker whose process
  is gone are touched; the marker records host, boot and the process start time, so a reused pid,
  or a process of another host writing to a shared filesystem, is never taken for ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from export import __version__
from export.errors import ExportError
from export.process import pid_alive

MARKER = ".ffn-export"
TOOL = "ffn-fusion-export"
# `.NAME.tmp-PID-START-TAG` (START: the process start time, clock ticks since boot); a directory
# named `.NAME.tmp-PID-TAG` was made before the start time was recorded (no marker either).
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-(?P<start>\d+))?-(?P<tag>[0-9a-f]{8})$")
# A pre-marker temp dir is stale once its pid is gone and nothing in it changed for this long.
LEGACY_IDLE_S = 3600.0
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# Outputs written before the marker existed, recognised by a file only this toolkit writes, and what it must hold.
LEGACY_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("manifest.json", ("toolkit_version", "source_sha256", "engines")),  # engines/NAME from `convert`
    ("fusion_plan.json", ("plan", "groups", "layer_map")),  # a fused checkpoint from `fuse`
    ("triton_deploy.json", ("backend", "world_size", "settings")),  # a model repository from `package`
    ("dependency.json", ("definition", "aggregation", "matrix")),  # an analysis from `analyze`
    ("report.json", ("levels", "rounds_per_client", "runs")),  # out/bench-serve from `bench serve`
)


# ---- who is writing -------------------------------------------------------------------------
def _pid_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; fields after the name start at 3
    except (IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _marker_text() -> str:
    pid = os.getpid()
    return json.dumps({"tool": TOOL, "version": __version__, "pid": pid, "pid_start": _pid_start(pid),
                       "host": socket.gethostname(), "boot_id": _boot_id(), "created": time.time()}) + "\n"


def read_marker(path: Path) -> dict | None:
    """The marker of directory `path`, or None when it has none (or one that is not ours)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _recorded_engine(path: Path) -> bool:
    """engines/NAME/onnx or trtllm from before the marker: the engine dir's manifest records it by name."""
    manifest = _read_json(path.parent / "manifest.json")
    engines = manifest.get("engines") if manifest and "toolkit_version" in manifest else None
    return isinstance(engines, dict) and any(isinstance(e, dict) and e.get("path") == path.name
                                             for e in engines.values())


def is_ours(path: Path) -> bool:
    """True if directory `path` is an output of this toolkit (marker, or a pre-marker signature file)."""
    path = Path(path)
    if read_marker(path) is not None:
        return True
    for name, keys in LEGACY_SIGNATURES:
        data = _read_json(path / name)
        if data is not None and all(k in data for k in keys):
            return True
    return _recorded_engine(path)


# ---- the checks ------------------------------------------------------------------------------
def _check_inputs(out: Path, inputs: Iterable[str | Path | None]) -> None:
    real = Path(os.path.realpath(out))
    for inp in inputs:
        if inp is None:
            continue
        src = Path(os.path.realpath(inp))
        if real == src:
            why = "is the input"
        elif real.is_relative_to(src):
            why = "lies inside the input"
        elif src.is_relative_to(real):
            why = "contains the input"
        else:
            continue
        raise ExportError(f"{out}: {why} {inp}; an output may not be, lie inside or contain an input "
                          f"(choose another output path)")


def _foreign_entries(out: Path, marker: dict | None) -> list[str]:
    """Top-level entries of our output `out` that we did not write (a user's files put inside it).

    The marker lists what the output held when it was complete; later stages add their own marked
    subdirectories (engines/NAME/onnx, trtllm) and temp files, which are ours too.
    """
    if marker is None or "entries" not in marker:
        return []  # made before entries were recorded: nothing to compare with
    known = set(marker["entries"]) | {MARKER}
    return sorted(p.name for p in out.iterdir()
                  if p.name not in known and not TEMP_NAME.match(p.name) and not (p.is_dir() and is_ours(p)))


def _check_existing(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise ExportError(f"{out}: is a symbolic link; refusing to replace it (give the real path as --out)")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; refusing to replace it with one "
                          f"(choose another output path)")
    if not is_ours(out):
        raise ExportError(f"{out}: exists and is not an output of this toolkit; refusing to replace it "
                          f"(choose another --out, or move it away yourself)")
    foreign = _foreign_entries(out, read_marker(out))
    if foreign:
        raise ExportError(f"{out}: holds files this toolkit did not write ({', '.join(foreign[:5])}); refusing "
                          f"to replace it (move them away, or choose another --out)")
    if not overwrite:
        raise ExportError(f"{out}: exists (a previous output of this toolkit); pass --overwrite to replace it")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    while not os.path.ismount(path):
        path = path.parent
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _check_space(out: Path, planned_bytes: int | None) -> None:
    if not planned_bytes:
        return
    where = _existing_ancestor(out.parent)
    free = shutil.disk_usage(where).free
    if planned_bytes > free:
        raise ExportError(f"{out}: needs {human_bytes(planned_bytes)}, {human_bytes(free)} free on "
                          f"{_mount_point(where)}")


def check_output(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 planned_bytes: int | None = None) -> Path:
    """Refuse `out` now, before the expensive work, if writing it would break the policy.

    Returns `out` as an absolute path. Writes nothing.
    """
    out = Path(out).absolute()
    _check_inputs(out, inputs)
    _check_existing(out, overwrite)
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise ExportError(f"{out}: {parent} is not a directory")
    _check_space(out, planned_bytes)
    return out


def check_output_file(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """The file-output rule (`plan --out plan.json`): never an input, never a directory, and an
    existing file is replaced only with `overwrite` (a file carries no marker, so any file counts)."""
    out = Path(out).absolute()
    _check_inputs(out, inputs)
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; give a file name")
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")
    return out


# ---- writing -------------------------------------------------------------------------------
def _temp_name(out: Path, kind: str = "tmp") -> Path:
    pid = os.getpid()
    return out.parent / f".{out.name}.{kind}-{pid}-{_pid_start(pid) or 0}-{uuid.uuid4().hex[:8]}"


def _no_space_error(out: Path, e: OSError, written: int, free_at_start: int) -> ExportError:
    return ExportError(f"{out}: {os.strerror(e.errno).lower()} on {_mount_point(out.parent)} after writing "
                       f"{human_bytes(written)} ({human_bytes(free_at_start)} was free); nothing was written")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


def _put_in_place(tmp: Path, out: Path) -> None:
    """`tmp` (complete) becomes `out`; an existing `out` is moved away only in the same step."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        old = tmp  # now holds the previous output
    else:
        old = _temp_name(out, "old")
        out.rename(old)
        tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _finish_marker(tmp: Path) -> None:
    """Record what the complete output holds, so a later replace can tell a user's additions."""
    data = read_marker(tmp) or json.loads(_marker_text())
    data["entries"] = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    data["completed"] = time.time()
    (tmp / MARKER).write_text(json.dumps(data) + "\n")


@contextmanager
def output_dir(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
               planned_bytes: int | None = None) -> Iterator[Path]:
    """Yield a fresh marked temporary directory that becomes `out` only if the block succeeds.

    The policy is checked again here (the caller should already have called `check_output`), and
    once more just before the rename, in case something appeared at `out` during the run.
    """
    inputs = list(inputs)
    out = check_output(out, inputs=inputs, overwrite=overwrite, planned_bytes=planned_bytes)
    tmp = _temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"{out}: cannot create it here ({e.strerror})") from None
    clean_stale(out.parent)
    free_at_start = shutil.disk_usage(out.parent).free
    try:
        (tmp / MARKER).write_text(_marker_text())
        yield tmp
        _finish_marker(tmp)
        _check_existing(out, overwrite)
        _put_in_place(tmp, out)
    except OSError as e:
        written = tree_bytes(tmp) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in NO_SPACE:
            raise _no_space_error(out, e, written, free_at_start) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tree_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (what copying it will take)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- stale temp dirs -------------------------------------------------------------------------
@dataclass(frozen=True)
class TempDir:
    path: Path
    stale: bool
    reason: str
    nbytes: int


def _newest_change(path: Path) -> float:
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            newest = max(newest, p.lstat().st_mtime)
    return newest


def judge(path: Path) -> TempDir | None:
    """Whether `path` is one of our temp dirs, and if so whether its writer is gone (None: not ours)."""
    m = TEMP_NAME.match(path.name)
    if m is None or path.is_symlink() or not path.is_dir():
        return None
    pid = int(m["pid"])
    if m["start"] is None:
        return _judge_legacy(path, pid)
    marker = read_marker(path)
    if marker is None and any(path.iterdir()):
        return None  # our name but not our marker: not ours to touch
    size = tree_bytes(path)
    if marker is not None and marker.get("host") not in (None, socket.gethostname()):
        return TempDir(path, False, f"made on host {marker['host']}", size)
    if marker is not None and marker.get("boot_id") and marker["boot_id"] != _boot_id():
        return TempDir(path, True, "made before the last reboot", size)
    if not pid_alive(pid):
        return TempDir(path, True, f"its process {pid} is gone", size)
    start = int(m["start"])
    now = _pid_start(pid)
    if start and now is not None and now != start:
        return TempDir(path, True, f"pid {pid} now belongs to another process", size)
    return TempDir(path, False, f"process {pid} is still writing it", size)


def _judge_legacy(path: Path, pid: int) -> TempDir:
    """A temp dir from before the marker: stale once its pid is gone and it has been idle an hour."""
    size = tree_bytes(path)
    if pid_alive(pid):
        return TempDir(path, False, f"process {pid} is running", size)
    idle = time.time() - _newest_change(path)
    if idle < LEGACY_IDLE_S:
        return TempDir(path, False, f"older format, idle only {idle:.0f} s", size)
    return TempDir(path, True, f"older format, its process {pid} is gone", size)


def find_temp_dirs(root: str | Path) -> list[TempDir]:
    """Our temp dirs under `root` (recursively; symlinks are not followed)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        for name in list(dirnames):
            entry = judge(Path(dirpath) / name)
            if entry is not None:
                found.append(entry)
                dirnames.remove(name)  # never descend into a temp dir
    return sorted(found, key=lambda t: str(t.path))


def clean_stale(parent: str | Path) -> list[TempDir]:
    """Remove the stale temp dirs directly in `parent` (any target's, not only the one being written)."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for p in entries:
        entry = judge(p)
        if entry is not None and entry.stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(entry)
    return removed

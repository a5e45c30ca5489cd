"""Every file a checkpoint names (index entries, tokenizer and side files) stays inside the checkpoint.

A checkpoint is untrusted input: an index entry `../../elsewhere/model.safetensors`, or a symlink
planted beside the weights, would otherwise make us read (and copy into our output) files the
user never meant to hand over. The rule lives here, once:

- a name must be relative and must not climb out (`..`), whatever the options;
- a symlink is followed only if its target resolves inside the checkpoint directory, or, in the
  Hugging Face hub-cache layout (`models--org--name/snapshots/<rev>/file -> ../../blobs/<hash>`),
  inside that cache repo's `blobs/` directory;
- `follow_symlinks=True` (the CLI's `--follow-symlinks`) lifts the symlink rule only.

Commands that start worker processes (`generate`, `verify`, ...) pass the opt-in on through the
environment (`FOLLOW_SYMLINKS_ENV`), so a worker opening the checkpoint applies the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from export.errors import CheckpointError

FOLLOW_SYMLINKS_ENV = "EXPORT_FOLLOW_SYMLINKS"
HUB_SNAPSHOTS, HUB_BLOBS, HUB_REPO_PREFIX = "snapshots", "blobs", "models--"


def default_follow_symlinks() -> bool:
    """The opt-in a command without an explicit argument gets: off unless the CLI set it."""
    return os.environ.get(FOLLOW_SYMLINKS_ENV) == "1"


def set_default_follow_symlinks(on: bool) -> None:
    """Set by the CLI's `--follow-symlinks` for this process and every worker it starts."""
    if on:
        os.environ[FOLLOW_SYMLINKS_ENV] = "1"
    else:
        os.environ.pop(FOLLOW_SYMLINKS_ENV, None)


def checkpoint_file(root: Path, name: str, *, follow_symlinks: bool | None = None) -> Path:
    """`root/name`, refused (CheckpointError naming it) if the name or a symlink on it leads outside.

    The returned path is the one to open; it may not exist (callers check `is_file()` themselves).
    """
    root = Path(root)
    follow = default_follow_symlinks() if follow_symlinks is None else follow_symlinks
    rel = _relative(name, root)
    path = root / rel
    if follow or not _has_link(root, rel):
        return path
    target = _resolve(path, root, name)
    if not _allowed(root.resolve(), target):
        raise CheckpointError(f"{name} is a symlink to {target}, outside the checkpoint; refusing to read it "
                              f"(pass --follow-symlinks to allow links out of the checkpoint)", root)
    return path


def _relative(name: str, root: Path) -> PurePosixPath:
    """A plain relative path with no `..`; an index entry is data, not a path to wherever it likes."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or "\x00" in name:
        raise CheckpointError(f"file name {name!r} points outside the checkpoint directory", root)
    return rel


def _has_link(root: Path, rel: PurePosixPath) -> bool:
    """Whether any component below `root` is a symlink (the root itself is the user's choice)."""
    path = root
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


def _resolve(path: Path, root: Path, name: str) -> Path:
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        what = (f"is a symlink to {os.readlink(path)}, which does not exist" if path.is_symlink()
                else "does not exist (it is under a symlinked directory)")
        raise CheckpointError(f"{name} {what}", root) from None
    except (OSError, RuntimeError) as e:  # a loop: RuntimeError before Python 3.13, OSError after
        raise CheckpointError(f"{name} is a symlink that cannot be resolved ({e})", root) from None


def _allowed(root: Path, target: Path) -> bool:
    """Inside the (resolved) checkpoint, or in the hub cache repo's blobs/ beside snapshots/<rev>/."""
    if target.is_relative_to(root):
        return True
    snapshots = root.parent
    repo = snapshots.parent
    return (snapshots.name == HUB_SNAPSHOTS and repo.name.startswith(HUB_REPO_PREFIX)
            and target.is_relative_to(repo / HUB_BLOBS))


def check_tree(root: Path, *, follow_symlinks: bool | None = None) -> None:
    """Every file link anywhere under `root` obeys `checkpoint_file`: for stages that read the whole
    tree (convert hashes every file into the manifest's source_sha256), not only the files they name."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_symlink() and not p.name.startswith("."):
            checkpoint_file(root, p.relative_to(root).as_posix(), follow_symlinks=follow_symlinks)


FOLLOW_SYMLINKS_HELP = ("read files the checkpoint links to outside its directory (default: refused, except "
                        "the Hugging Face cache's snapshots/<rev>/ -> blobs/ links)")

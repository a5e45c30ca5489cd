"""Outputs appear whole or not at all: write into a temporary sibling, then rename into place.

Directories go through `export.io.output.output_dir`, which also applies the output policy
(never replace what we did not create, never overlap an input, free space, stale temp dirs).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path


def atomic_output_dir(target: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                      planned_bytes: int | None = None) -> AbstractContextManager[Path]:
    """The former name of `export.io.output.output_dir` (same policy; kept for callers not yet moved)."""
    from export.io.output import output_dir

    return output_dir(target, inputs=inputs, overwrite=overwrite, planned_bytes=planned_bytes)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)

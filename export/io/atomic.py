"""A file that appears whole or not at all: written to a temporary sibling, then renamed into place.

Directories go through `export.io.output.output_dir`, which also applies the output policy
(never replace what we did not create, never overlap an input, free space, stale temp dirs).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)

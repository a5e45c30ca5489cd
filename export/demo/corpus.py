"""The training text: the running interpreter's standard-library `.py` sources.

License-clean (PSF) and present on every machine, so the recipe needs no download. Files are split
into train and held-out by a hash of their relative path, so the split is stable across machines
and independent of file order; the sorted file list is hashed so a card records exactly which
corpus it saw.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Test suites, bundled third-party packages and generated data tables (codec maps, pydoc topics) are
# left out: we want library code, and the codec tables alone would teach the model to emit tables.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                           "encodings", "pydoc_data"})
HELDOUT_PER_MILLE = 50  # 5% of files


@dataclass(frozen=True)
class CorpusFile:
    root: Path
    rel: str  # posix path relative to the stdlib root; the split and the hash use only this

    @property
    def heldout(self) -> bool:
        return int(hashlib.sha256(self.rel.encode()).hexdigest(), 16) % 1000 < HELDOUT_PER_MILLE

    def text(self) -> str | None:
        """The source, or None when it is not UTF-8 (a few deliberate encoding test fixtures)."""
        try:
            return (self.root / self.rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[CorpusFile]:
    """Every library `.py` file under the stdlib, sorted by relative path."""
    root = root or stdlib_root()
    files = [CorpusFile(root, p.relative_to(root).as_posix()) for p in root.rglob("*.py")
             if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda f: f.rel)


def corpus_hash(files: list[CorpusFile]) -> str:
    """sha256 of the sorted relative paths plus their sizes: changes when the interpreter does."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}\t{(f.root / f.rel).stat().st_size}\n".encode())
    return h.hexdigest()


def split(files: list[CorpusFile]) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """(train, held-out), each still sorted by path."""
    return [f for f in files if not f.heldout], [f for f in files if f.heldout]

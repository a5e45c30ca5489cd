"""What a path given for a model holds: config.json, an HF checkpoint, our TRT-LLM checkpoint, or an
`engines/NAME` directory (which stands for its `checkpoint/`).

One answer for every command, so `inspect engines/NAME` works where `generate` and `verify` do.
Only config files are read here (no torch), so `inspect` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from export.spec import ModelSpec


def resolve(path: str | Path) -> Path:
    """An `engines/NAME` directory stands for its `checkpoint/`."""
    path = Path(path)
    if (path / "manifest.json").is_file() and (path / "checkpoint").is_dir():
        return path / "checkpoint"
    return path


def is_trtllm_checkpoint(path: Path) -> bool:
    """TRT-LLM's config.json has a top-level "architecture" (HF's says "architectures")."""
    cfg = path / "config.json"
    if not cfg.is_file() or not (path / "rank0.safetensors").is_file():
        return False
    try:
        return "architecture" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def hf_checkpoint(path: str | Path) -> Path:
    """The HF checkpoint a command that rewrites weights (convert, fuse) reads: the path itself, or
    for an `engines/NAME` directory the HF checkpoint it was converted from (its manifest's
    `source_path`), so every command takes an engine directory where a checkpoint is expected."""
    path = Path(path)
    if not ((path / "manifest.json").is_file() and (path / "checkpoint").is_dir()):
        return path
    from export.errors import ExportError
    from export.manifest import Manifest

    source = Path(Manifest.load(path).source_path)
    if not (source / "config.json").is_file():
        raise ExportError(f"{path} is an engine directory; its HF source {source} (manifest.json source_path) "
                          f"is gone: pass the HF checkpoint itself")
    print(f"{path} is an engine directory: reading the HF checkpoint it came from, {source}", file=sys.stderr)
    return source


def load_spec(path: str | Path) -> ModelSpec:
    """The model description of any of the paths above."""
    path = resolve(path)
    if path.is_dir() and is_trtllm_checkpoint(path):
        from export.trtllm.config import read_trtllm_config

        return read_trtllm_config(path)[0]
    return ModelSpec.load(path)

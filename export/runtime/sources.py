"""Which weights a path holds: an HF checkpoint, or the TRT-LLM checkpoint we exported.

Both come back as the same triple, so the runtime (and `verify`) cannot tell them apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from export.errors import ExportError
from export.io.reader import CheckpointReader
from export.mapping import Mapping
from export.spec import ModelSpec
from export.weights import HFRankWeights, RankWeights

Source = tuple[ModelSpec, Mapping | None, Callable[[Mapping, int], RankWeights]]


def is_trtllm_checkpoint(path: Path) -> bool:
    """TRT-LLM's config.json has a top-level "architecture" (HF's says "architectures")."""
    cfg = path / "config.json"
    if not cfg.is_file() or not (path / "rank0.safetensors").is_file():
        return False
    try:
        return "architecture" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def resolve(path: Path) -> Path:
    """An `engines/NAME` directory stands for its `checkpoint/`."""
    if (path / "manifest.json").is_file() and (path / "checkpoint").is_dir():
        return path / "checkpoint"
    return path


def open_source(path: Path) -> Source:
    path = resolve(Path(path))
    if not path.is_dir():
        raise ExportError(f"{path}: not a checkpoint directory")
    if is_trtllm_checkpoint(path):
        from export.trtllm.weights import open_trtllm_checkpoint
        return open_trtllm_checkpoint(path)
    spec = ModelSpec.load(path)
    reader = CheckpointReader(path)
    reader.validate(spec)
    return spec, None, lambda mapping, rank: HFRankWeights(reader, spec, mapping, rank)

"""The weights-source registry: which format a path holds, and how to open its weights lazily.

Every reader of weights (the runtime, `verify`, fusion, the ONNX export) opens a path here and
gets the same `Source`: the model description, the split the files were written for (None: any,
sliced at load), and (mapping, rank) -> `RankWeights`. Every format reads through the one validated
`CheckpointReader` (memory-mapped slices); `convert`'s single streaming pass reads the same
validated files by `pread` (`export.io.raw_tensors`). Adding a format (FP8 variants next) is one
`Format` entry in `FORMATS`, tried in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from export.engine_dir import weights_dir
from export.errors import ExportError
from export.io.reader import CheckpointReader
from export.mapping import Mapping
from export.model_dir import is_trtllm_checkpoint
from export.spec import ModelSpec
from export.trtllm.weights import open_trtllm_checkpoint
from export.weights import HFRankWeights, RankWeights


class Source(NamedTuple):
    spec: ModelSpec
    mapping: Mapping | None  # the split the files hold; None: any split, sliced at load
    rank_weights: Callable[[Mapping, int], RankWeights]


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], bool]  # config files only: cheap, no tensor read
    open: Callable[[Path], Source]  # validates everything it will read, before returning


def open_hf_checkpoint(path: Path) -> Source:
    """An HF checkpoint: config and every weight header checked, then each rank's pieces sliced on read."""
    spec = ModelSpec.load(path)
    reader = CheckpointReader(path)
    reader.validate(spec)
    return Source(spec, None, lambda mapping, rank: HFRankWeights(reader, spec, mapping, rank))


def open_trtllm(path: Path) -> Source:
    return Source(*open_trtllm_checkpoint(path))


FORMATS: tuple[Format, ...] = (
    Format("trtllm", is_trtllm_checkpoint, open_trtllm),  # config.json with "architecture" + rank files
    Format("hf", lambda path: True, open_hf_checkpoint),  # anything else is read as HF (ModelSpec says why not)
)


def detect(path: str | Path) -> tuple[Path, Format]:
    """The weights directory `path` stands for (an engine directory's checkpoint) and its format."""
    path = weights_dir(path)
    if not path.is_dir():
        raise ExportError(f"{path}: not a checkpoint directory")
    return path, next(f for f in FORMATS if f.detect(path))


def open_source(path: str | Path) -> Source:
    """The weights at `path` (an HF checkpoint, a TRT-LLM checkpoint, or an engine directory)."""
    path, fmt = detect(path)
    return fmt.open(path)

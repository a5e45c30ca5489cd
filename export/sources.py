"""The weights-source registry: which format a path holds, its model description, and how to open
its weights lazily.

A path given for a model is an HF checkpoint, our TRT-LLM checkpoint, or an `engines/NAME`
directory (which stands for its checkpoint, `EngineDir.checkpoint`): one answer for every
command, so `inspect engines/NAME` works where `generate` and `verify` do.

Every reader of weights (the runtime, `verify`, fusion, the ONNX export) opens a path here and
gets the same `Source`: the model description, the split the files were written for (None: any,
sliced at load), and (mapping, rank) -> `RankWeights`. Every format reads through the one validated
`CheckpointReader` (memory-mapped slices); `convert`'s single streaming pass reads the same
validated files by `pread` (`export.io.raw_tensors`). Adding a format (FP8 variants next) is one
`Format` entry in `FORMATS`, tried in order.

Detecting a format and reading its description touch config files only; the readers (and torch)
are imported when weights are opened, so `inspect` and `package` stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from export.engine_dir import weights_dir
from export.errors import ExportError
from export.mapping import Mapping
from export.spec import ModelSpec
from export.trtllm.config import read_trtllm_config

if TYPE_CHECKING:
    from export.rank_weights import RankWeights


class Source(NamedTuple):
    spec: ModelSpec
    mapping: Mapping | None  # the split the files hold; None: any split, sliced at load
    rank_weights: Callable[[Mapping, int], RankWeights]


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], bool]  # config files only: cheap, no tensor read
    spec: Callable[[Path], ModelSpec]  # the model description, from config files only
    open: Callable[[Path], Source]  # validates everything it will read, before returning


def is_trtllm_checkpoint(path: Path) -> bool:
    """TRT-LLM's config.json has a top-level "architecture" (HF's says "architectures")."""
    cfg = path / "config.json"
    if not cfg.is_file() or not (path / "rank0.safetensors").is_file():
        return False
    try:
        return "architecture" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def open_hf_checkpoint(path: Path) -> Source:
    """An HF checkpoint: config and every weight header checked, then each rank's pieces sliced on read."""
    from export.io.reader import CheckpointReader
    from export.rank_weights import HFRankWeights

    spec = ModelSpec.load(path)
    reader = CheckpointReader(path)
    reader.validate(spec)
    return Source(spec, None, lambda mapping, rank: HFRankWeights(reader, spec, mapping, rank))


def open_trtllm(path: Path) -> Source:
    """Our TRT-LLM checkpoint: every rank file checked against the plan; only its own split loads."""
    from export.trtllm.rank_files import open_trtllm_checkpoint

    return Source(*open_trtllm_checkpoint(path))


FORMATS: tuple[Format, ...] = (
    # config.json with "architecture" + rank files
    Format("trtllm", is_trtllm_checkpoint, lambda path: read_trtllm_config(path)[0], open_trtllm),
    # anything else is read as HF (ModelSpec.load says what is wrong with it)
    Format("hf", lambda path: True, ModelSpec.load, open_hf_checkpoint),
)


def detect(path: str | Path) -> tuple[Path, Format]:
    """The weights directory `path` stands for (an engine directory's checkpoint) and its format."""
    path = weights_dir(path)
    if not path.is_dir():
        raise ExportError(f"{path}: not a checkpoint directory")
    return path, next(f for f in FORMATS if f.detect(path))


def load_spec(path: str | Path) -> ModelSpec:
    """The model description of any path above, or of a bare config.json (`inspect`, `--dry-run`)."""
    path = weights_dir(path)
    if not path.is_dir():
        return ModelSpec.load(path)
    return next(f for f in FORMATS if f.detect(path)).spec(path)


def open_source(path: str | Path) -> Source:
    """The weights at `path` (an HF checkpoint, a TRT-LLM checkpoint, or an engine directory)."""
    path, fmt = detect(path)
    return fmt.open(path)

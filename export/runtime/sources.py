"""Which weights a path holds: an HF checkpoint, or the TRT-LLM checkpoint we exported.

Both come back as the same triple, so the runtime (and `verify`) cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from export.errors import ExportError
from export.io.reader import CheckpointReader
from export.mapping import Mapping
from export.model_dir import is_trtllm_checkpoint, resolve
from export.spec import ModelSpec
from export.weights import HFRankWeights, RankWeights

Source = tuple[ModelSpec, Mapping | None, Callable[[Mapping, int], RankWeights]]


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

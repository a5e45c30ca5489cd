"""Where a rank's weights come from, behind one interface the reference runtime consumes.

`RankWeights.get(role, layer)` returns the rank-local (already sharded) tensor. The HF source
slices with `export.sharding`; the TRT-LLM source (`export.trtllm.rank_files`) reads the rank file we
wrote for TRT-LLM. Both read through `CheckpointReader`, and `export.sources` picks the format of a
path, so the runtime cannot tell them apart: that is how `verify` checks the exported files
themselves.
"""

from __future__ import annotations

from typing import Protocol

import torch

from export.io.reader import CheckpointReader
from export.layout import on_rank
from export.mapping import Mapping
from export.sharding import shard_for
from export.spec import ModelSpec
from export.tensors import Role, ScaleRef, TensorRef, branch_roles, global_ref, is_fp8, layer_roles


class RankWeights(Protocol):
    spec: ModelSpec
    mapping: Mapping
    rank: int

    def get(self, role: Role, layer: int | None = None) -> torch.Tensor:
        """The rank's piece of tensor (role, global layer); KeyError if the rank holds none. An FP8
        linear (`tensors.is_fp8`) comes as float8_e4m3fn, with its scales from `scale`."""
        ...

    def scale(self, ref: ScaleRef) -> float:
        """A per-tensor scale (the same on every rank: per-tensor scales are not sharded)."""
        ...


def find_ref(spec: ModelSpec, role: Role, layer: int | None, branch: int | None = None) -> TensorRef:
    """The full tensor (role, global layer[, branch]) of the description; KeyError if it has none."""
    if layer is None:
        return global_ref(spec, role)
    if branch is not None:  # a parallel_blocks branch's own tensor
        for k, r, shape in branch_roles(spec, layer):
            if (k, r) == (branch, role):
                return TensorRef(role, layer, shape, branch)
        raise KeyError(f"layer {layer} parallel_blocks.{branch} has no {role.value} tensor")
    for r, shape in layer_roles(spec, layer):
        if r is role:
            return TensorRef(role, layer, shape)
    raise KeyError(f"layer {layer} has no {role.value} tensor")


class HFRankWeights:
    """A rank's pieces read straight from an HF checkpoint: sliced reads, nothing else loaded."""

    def __init__(self, reader: CheckpointReader, spec: ModelSpec, mapping: Mapping, rank: int,
                 dtype: torch.dtype | None = None) -> None:
        self.reader, self.spec, self.mapping, self.rank, self.dtype = reader, spec, mapping, rank, dtype

    def get(self, role: Role, layer: int | None = None, branch: int | None = None) -> torch.Tensor:
        ref = find_ref(self.spec, role, layer, branch)
        if not on_rank(ref, self.spec, self.mapping, self.rank):
            raise KeyError(f"rank {self.rank} holds no {role.value} of layer {layer}")
        shard = shard_for(self.spec, ref, self.mapping.tp_rank(self.rank), self.mapping.tp,
                          self.mapping.embedding_shard)
        t = self.reader.read(ref, shard)
        return t.to(self.dtype) if self.dtype is not None and not is_fp8(self.spec, ref) else t

    def scale(self, ref: ScaleRef) -> float:
        return self.reader.scale(ref)

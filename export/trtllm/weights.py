"""Read a TRT-LLM checkpoint's rank files back as `RankWeights`, for the reference runtime.

`verify` runs the runtime on exactly the bytes TRT-LLM would load: each `get` maps (role, global
layer) to the rank file's name (local layer index) through the same plan the converter wrote, and
cuts q, k or v out of the packed qkv by row range. Reads are lazy slices of a memory map.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from export.errors import CheckpointError, ExportError
from export.io.safetensors_format import read_header, torch_dtype
from export.layout import lm_head_ref
from export.manifest import MANIFEST, Manifest
from export.mapping import Mapping
from export.spec import ModelSpec
from export.tensors import Role
from export.trtllm.config import read_trtllm_config
from export.trtllm.plan import RankPlan, plan_rank
from export.weights import RankWeights, find_ref


def checkpoint_dir(path: Path) -> Path:
    """`engines/NAME` (via its manifest) or the checkpoint directory itself."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path / Manifest.load(path).checkpoint
    if (path / "checkpoint" / "config.json").is_file():
        return path / "checkpoint"
    return path


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank{rank}.safetensors"


def check_rank_files(ckpt: Path, spec: ModelSpec, mapping: Mapping) -> None:
    """Headers of every rank file against the plan (names, shapes, dtype); all problems at once."""
    want = torch_dtype(spec.dtype)
    problems: list[str] = []
    for rank in mapping.ranks():
        f = rank_file(ckpt, rank)
        if not f.is_file():
            problems.append(f"{f.name} is missing (world size {mapping.world_size})")
            continue
        try:
            infos, _, _ = read_header(f)
        except CheckpointError as e:
            problems += [f"{f.name}: {p}" for p in e.problems]
            continue
        plan = plan_rank(spec, mapping, rank)
        for name, shape in plan.tensors.items():
            info = infos.get(name)
            if info is None:
                problems.append(f"{f.name}: missing tensor {name}")
            elif info.shape != shape or info.dtype != want:
                problems.append(f"{f.name}: {name} is {list(info.shape)} {info.dtype}, "
                                f"expected {list(shape)} {want}")
        problems += [f"{f.name}: unexpected tensor {n}" for n in infos if n not in plan.tensors]
    if problems:
        raise CheckpointError(problems, ckpt)


class TRTLLMRankWeights:
    """One rank's tensors from `rank{r}.safetensors`, as the runtime's `RankWeights`."""

    def __init__(self, ckpt: Path, spec: ModelSpec, mapping: Mapping, rank: int) -> None:
        self.spec, self.mapping, self.rank = spec, mapping, rank
        self.plan: RankPlan = plan_rank(spec, mapping, rank)
        self._file: Any = safe_open(str(rank_file(ckpt, rank)), framework="pt")

    def get(self, role: Role, layer: int | None = None) -> torch.Tensor:
        ref = lm_head_ref(self.spec) if role is Role.LM_HEAD else find_ref(self.spec, role, layer)
        p = self.plan.placement(ref.role, ref.layer)
        if p.rows == self.plan.tensors[p.name][0]:
            return self._file.get_tensor(p.name)
        return self._file.get_slice(p.name)[p.row:p.row + p.rows]


def open_trtllm_checkpoint(path: Path) -> tuple[ModelSpec, Mapping, Callable[[Mapping, int], RankWeights]]:
    """(spec, the checkpoint's mapping, (mapping, rank) -> RankWeights) for a TRT-LLM checkpoint.

    The files are checked against the plan up front, so a bad file fails here, by name, not
    halfway through a model load. The mapping passed to the factory must be the checkpoint's own:
    rank files cannot be re-sharded.
    """
    ckpt = checkpoint_dir(Path(path))
    spec, mapping = read_trtllm_config(ckpt)
    check_rank_files(ckpt, spec, mapping)

    def weights(m: Mapping, rank: int) -> RankWeights:
        if m != mapping:
            raise ExportError(f"{ckpt} was written for tp={mapping.tp}, pp={mapping.pp}; "
                              f"it cannot be loaded at tp={m.tp}, pp={m.pp} (convert again)")
        if rank not in mapping.ranks():
            raise ExportError(f"rank {rank} is outside world size {mapping.world_size}")
        return TRTLLMRankWeights(ckpt, spec, mapping, rank)

    return spec, mapping, weights

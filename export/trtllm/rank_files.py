"""The TRT-LLM checkpoint format (config.json + rank{r}.safetensors) read back as `RankWeights`.

`verify` runs the runtime on exactly the bytes TRT-LLM would load: each `get` maps (role, global
layer) to the rank file's name (local layer index) through the same plan the converter wrote, and
cuts q, k or v out of the packed qkv by row range. Each rank file is opened by `CheckpointReader`
(paths and header checked), so reads are lazy slices of a memory map.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from export.engine_dir import weights_dir
from export.errors import CheckpointError, ExportError
from export.io.reader import CheckpointReader
from export.io.safetensors_format import torch_dtype
from export.mapping import Mapping
from export.rank_weights import RankWeights, find_ref
from export.spec import ModelSpec
from export.tensors import Role
from export.trtllm.config import read_trtllm_config
from export.trtllm.rank_layout import RankPlan, plan_rank


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / rank_name(rank)


def rank_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def rank_reader(ckpt: Path, rank: int) -> CheckpointReader:
    """The validated reader of one rank file (CheckpointError naming it if its header is bad)."""
    return CheckpointReader(ckpt, files=[rank_name(rank)])


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
            reader = rank_reader(ckpt, rank)
        except CheckpointError as e:
            problems += e.problems
            continue
        plan = plan_rank(spec, mapping, rank)
        names = set(reader.names())
        for name, shape in plan.tensors.items():
            if name not in names:
                problems.append(f"{f.name}: missing tensor {name}")
                continue
            info = reader.info(name)
            if info.shape != shape or info.dtype != want:
                problems.append(f"{f.name}: {name} is {list(info.shape)} {info.dtype}, "
                                f"expected {list(shape)} {want}")
        problems += [f"{f.name}: unexpected tensor {n}" for n in reader.names() if n not in plan.tensors]
    if problems:
        raise CheckpointError(problems, ckpt)


class TRTLLMRankWeights:
    """One rank's tensors from `rank{r}.safetensors`, as the runtime's `RankWeights`."""

    def __init__(self, ckpt: Path, spec: ModelSpec, mapping: Mapping, rank: int) -> None:
        self.spec, self.mapping, self.rank = spec, mapping, rank
        self.plan: RankPlan = plan_rank(spec, mapping, rank)
        self.reader = rank_reader(ckpt, rank)

    def get(self, role: Role, layer: int | None = None) -> torch.Tensor:
        ref = find_ref(self.spec, role, layer)
        p = self.plan.placement(ref.role, ref.layer)
        if p.rows == self.plan.tensors[p.name][0]:
            return self.reader.get(p.name)
        return self.reader.get_slice(p.name)[p.row:p.row + p.rows]


def open_trtllm_checkpoint(path: Path) -> tuple[ModelSpec, Mapping, Callable[[Mapping, int], RankWeights]]:
    """(spec, the checkpoint's mapping, (mapping, rank) -> RankWeights) for a TRT-LLM checkpoint
    (or the engine directory holding it).

    The files are checked against the plan up front, so a bad file fails here, by name, not
    halfway through a model load. The mapping passed to the factory must be the checkpoint's own:
    rank files cannot be re-sharded.
    """
    ckpt = weights_dir(path)
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

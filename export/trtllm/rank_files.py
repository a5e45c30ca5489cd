"""The TRT-LLM checkpoint format (config.json + rank{r}.safetensors) read back as `RankWeights`.

`verify` runs the runtime on exactly the bytes TRT-LLM would load: each `get` maps (role, global
layer) to the rank file's name (local layer index) through the same plan the converter wrote, and
cuts q, k or v out of the packed qkv by row range. Each rank file is opened by `CheckpointReader`
(paths and header checked), so reads are lazy slices of a memory map.

An FP8 checkpoint's linears come back as float8_e4m3fn; `scale(ScaleRef)` reads the per-tensor
scale the plan names for it (q, k and v all read the qkv's; K and V the layer's KV scale). Every
scale is checked up front: present, (1,) float32, finite and > 0, the same on every tp rank of its
stage, and each `kv_cache_rcp_scaling_factor` the reciprocal of its `kv_cache_scaling_factor`.
"""

from __future__ import annotations

import math
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
from export.tensors import Role, ScaleRef
from export.trtllm.config import read_trtllm_config
from export.trtllm.names import KV_RCP_SCALE, KV_SCALE, trtllm_scale_name
from export.trtllm.rank_layout import RankPlan, plan_rank

RCP_RTOL = 1e-6  # kv_cache_rcp_scaling_factor * kv_cache_scaling_factor must be 1 to float32 rounding


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / rank_name(rank)


def rank_name(rank: int) -> str:
    return f"rank{rank}.safetensors"


def rank_reader(ckpt: Path, rank: int) -> CheckpointReader:
    """The validated reader of one rank file (CheckpointError naming it if its header is bad)."""
    return CheckpointReader(ckpt, files=[rank_name(rank)])


def check_rank_files(ckpt: Path, spec: ModelSpec, mapping: Mapping) -> None:
    """Headers of every rank file against the plan (names, shapes, dtypes) and every FP8 scale's
    value; all problems at once, each naming the file and tensor."""
    problems: list[str] = []
    seen: dict[tuple[int, str], tuple[str, float]] = {}  # (stage, scale) -> (first file, value)
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
                problems.append(f"{f.name}: missing tensor {name}{_why(plan, name, spec)}")
                continue
            info, want = reader.info(name), torch_dtype(plan.dtype_of(name, spec.dtype))
            if info.shape != shape or info.dtype != want:
                problems.append(f"{f.name}: {name} is {list(info.shape)} {_dt(info.dtype)}, expected {list(shape)} "
                                f"{_dt(want)}{_why(plan, name, spec)}")
            elif name in plan.scales:
                problems += _check_scale(f.name, reader, name, mapping.pp_rank(rank), seen)
        problems += [f"{f.name}: unexpected tensor {n}{_why(plan, n, spec)}" for n in reader.names()
                     if n not in plan.tensors]
    if problems:
        raise CheckpointError(problems, ckpt)


def _why(plan: RankPlan, name: str, spec: ModelSpec) -> str:
    """What config.json says of a tensor whose dtype or presence disagrees with it."""
    if name in plan.fp8 or name in plan.scales or name.endswith("scaling_factor"):
        return f" (config.json quantization: {spec.quant.describe()})"
    return ""


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_scale(fname: str, reader: CheckpointReader, name: str, stage: int,
                 seen: dict[tuple[int, str], tuple[str, float]]) -> list[str]:
    """One scale: finite and > 0, equal on every tp rank of its stage (per-tensor scales are not
    sharded), and a KV reciprocal equal to 1 / its KV scale."""
    value = float(reader.get(name).reshape(-1)[0])
    if not math.isfinite(value) or value <= 0:
        return [f"{fname}: {name} is {value}, expected a finite scale > 0"]
    first = seen.setdefault((stage, name), (fname, value))
    if first[1] != value:
        return [f"{fname}: {name} is {value!r} but {first[0]} has {first[1]!r}: a per-tensor scale must be the "
                f"same on every tp rank"]
    if name.endswith(KV_RCP_SCALE.rsplit(".", 1)[1]):
        kv = seen.get((stage, name.replace(KV_RCP_SCALE.rsplit(".", 1)[1], KV_SCALE.rsplit(".", 1)[1])))
        if kv is not None and abs(value * kv[1] - 1) > RCP_RTOL:
            return [f"{fname}: {name} is {value!r}, expected 1 / kv_cache_scaling_factor = {1 / kv[1]!r}"]
    return []


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

    def scale(self, ref: ScaleRef) -> float:
        """The rank file's scale for `ref` (checked by `check_rank_files`); KeyError if it holds none."""
        name = trtllm_scale_name(ref.kind, ref.role, self._local(ref.layer))
        if name not in self.plan.scales:
            raise KeyError(f"rank {self.rank} holds no {ref.kind.value} of {ref.role.value} of {ref.where()}")
        return float(self.reader.get(name).reshape(-1)[0])

    def _local(self, layer: int | None) -> int | None:
        if layer is None:
            return None
        return layer - self.mapping.pp_layers(self.spec.num_layers, self.mapping.pp_rank(self.rank)).start


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

"""Every rank file's tensors, and where each piece of each source tensor lands, before any write.

Placement and split come from `export.layout.rank_pieces` (which uses `export.sharding`); this
module only names the pieces (TRT-LLM names, local layer indices) and stacks packed parts (q, k, v)
into row ranges of one tensor. The converter, `--dry-run` and the rank-file reader all use it.

An FP8 description adds, per quantized TRT-LLM linear, its stored dtype (float8_e4m3fn) and its two
per-tensor scales, and per attention layer with an FP8 KV cache the two KV scales (`RankPlan.scales`:
which source scales each is the max of). Which linears are FP8 is written to config.json as
`exclude_modules` (TRT-LLM module names, local layer indices: `excluded_modules`) and read back
(`hf_excludes`): one rule both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from export.layout import Piece, check_layout, rank_pieces
from export.mapping import Mapping
from export.quantization import FP8_DTYPE
from export.sharding import Shard
from export.spec import DTYPE_BYTES, TRTLLM_STAGE, ModelSpec, normalize_dtype
from export.tensors import LINEAR_ROLES, Role, ScaleKind, ScaleRef, TensorRef, is_fp8, model_tensors, module_name
from export.trtllm.names import (
    KV_RCP_SCALE,
    KV_SCALE,
    check_name_table,
    packed_parts,
    trtllm_module,
    trtllm_name,
    trtllm_scale_name,
)

SCALE_DTYPE = "float32"
SCALE_SHAPE = (1,)  # FP8Linear / kv_cache_quantize declare Parameter(shape=(1,), dtype=float32)
# trtllm-build's exclusions when config.json has none (`quantize_layers` in quantization/quantize.py)
TRTLLM_DEFAULT_EXCLUDES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                           "*shared_expert_gate")


@dataclass(frozen=True)
class ScaleValue:
    """A rank-file scale: the max of these source scales (q/k/v share the qkv's; K and V share
    the layer's KV scale), or its reciprocal (`kv_cache_rcp_scaling_factor`)."""

    refs: tuple[ScaleRef, ...]
    reciprocal: bool = False


@dataclass(frozen=True)
class Placement:
    """Piece `piece` of a source tensor goes to rows [row, row + rows) of tensor `name` in rank `rank`."""

    piece: Piece
    rank: int
    name: str
    row: int

    @property
    def rows(self) -> int:
        return self.piece.shape[0]


@dataclass
class RankPlan:
    rank: int
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> shape, in file order
    placements: list[Placement] = field(default_factory=list)
    fp8: set[str] = field(default_factory=set)  # tensors stored as float8_e4m3fn
    scales: dict[str, ScaleValue] = field(default_factory=dict)  # float32 (1,) tensors, computed

    def dtype_of(self, name: str, dtype: str) -> str:
        """The stored dtype of tensor `name` in a checkpoint of `dtype`."""
        return FP8_DTYPE if name in self.fp8 else SCALE_DTYPE if name in self.scales else normalize_dtype(dtype)

    def nbytes(self, dtype: str) -> int:
        sizes = {FP8_DTYPE: 1, **DTYPE_BYTES}
        return sum(_numel(s) * sizes[self.dtype_of(n, dtype)] for n, s in self.tensors.items())

    def placement(self, role: Role, layer: int | None) -> Placement:
        for p in self.placements:
            if p.piece.ref.role is role and p.piece.ref.layer == layer:
                return p
        raise KeyError(f"rank {self.rank} holds no {role.value} of layer {layer}")


def window(p: Placement, first: int, stop: int) -> tuple[Shard, int] | None:
    """The part of placement `p` that source rows [first, stop) feed, as a shard of that row window
    plus the destination row it starts at; None when the window feeds none of it.

    The converter streams big tensors (Ultra's fused FFNs are ~14 GB) in row windows; this re-bases
    `p`'s shard onto a window, it does not split anything itself. Zero padding is written separately.
    """
    s = p.piece.shard
    if s.dim == 0:
        lo, hi = max(first, s.start), min(stop, s.stop)
        return (Shard(0, lo - first, hi - first), p.row + lo - s.start) if lo < hi else None
    if s.dim is None:
        return Shard(None), p.row + first
    return Shard(s.dim, s.start, s.stop), p.row + first


def _local(spec: ModelSpec, mapping: Mapping, rank: int, layer: int | None) -> int | None:
    if layer is None:
        return None
    return layer - mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank)).start


def plan_rank(spec: ModelSpec, mapping: Mapping, rank: int) -> RankPlan:
    """Rank `rank`'s file: each piece from `rank_pieces`, named, packed parts stacked in role order."""
    plan = RankPlan(rank)
    pieces = rank_pieces(spec, mapping, rank)
    by_key = {(p.ref.role, p.ref.layer): p for p in pieces}
    for piece in pieces:
        name = trtllm_name(piece.ref.role, _local(spec, mapping, rank, piece.ref.layer))
        parts = packed_parts(piece.ref.role)
        row = 0
        for role in parts[:parts.index(piece.ref.role)]:
            row += by_key[(role, piece.ref.layer)].shape[0]
        if name not in plan.tensors:
            rows = sum(by_key[(r, piece.ref.layer)].shape[0] for r in parts)
            plan.tensors[name] = (rows, *piece.shape[1:])
            _add_scales(plan, spec, piece.ref, parts, _local(spec, mapping, rank, piece.ref.layer))
        plan.placements.append(Placement(piece, rank, name, row))
    return plan


def _add_scales(plan: RankPlan, spec: ModelSpec, ref: TensorRef, parts: tuple[Role, ...], local: int | None) -> None:
    """Right after a new tensor: an FP8 linear's dtype and its two scales (a packed one's are the
    max of its parts'); after a qkv with an FP8 KV cache, the layer's KV scale and its reciprocal."""
    if is_fp8(spec, ref):
        plan.fp8.add(trtllm_name(ref.role, local))
        for kind in (ScaleKind.WEIGHT, ScaleKind.INPUT):
            name = trtllm_scale_name(kind, ref.role, local)
            plan.tensors[name] = SCALE_SHAPE
            plan.scales[name] = ScaleValue(tuple(ScaleRef(kind, r, ref.layer, ref.branch) for r in parts))
    if spec.quant.fp8_kv and Role.V in parts:
        kv = kv_scale_refs(ref.layer, ref.branch)
        for template, rcp in ((KV_SCALE, False), (KV_RCP_SCALE, True)):
            plan.tensors[template.format(i=local)] = SCALE_SHAPE
            plan.scales[template.format(i=local)] = ScaleValue(kv, rcp)


def kv_scale_refs(layer: int | None, branch: int | None = None) -> tuple[ScaleRef, ScaleRef]:
    """The k and v cache scales of an attention: TRT-LLM keeps their max, as one KV scale."""
    return ScaleRef(ScaleKind.K, Role.K, layer, branch), ScaleRef(ScaleKind.V, Role.V, layer, branch)


def _stage_linears(spec: ModelSpec, mapping: Mapping) -> list[tuple[TensorRef, str]]:
    """(linear weight, its TRT-LLM module name at its stage's local index), for every stage."""
    out = []
    for pp_rank in range(mapping.pp):
        rank = pp_rank * mapping.tp  # the stage's first rank: every tp rank holds the same modules
        out += [(p.ref, trtllm_module(p.ref.role, _local(spec, mapping, rank, p.ref.layer)))
                for p in rank_pieces(spec, mapping, rank) if p.ref.role in LINEAR_ROLES]
    return out


def excluded_modules(spec: ModelSpec, mapping: Mapping) -> list[str]:
    """config.json `quantization.exclude_modules` for an FP8 description: the TRT-LLM module of each
    linear left in the model dtype (trtllm-build matches these with fnmatch against its module
    names, which carry local layer indices). Empty, not None: None means TRT-LLM's own defaults."""
    if not spec.quant.fp8:
        return []
    return sorted({module for ref, module in _stage_linears(spec, mapping) if not is_fp8(spec, ref)})


def quant_layout_problems(spec: ModelSpec, mapping: Mapping) -> list[str]:
    """What a TRT-LLM FP8 checkpoint of `spec` at `mapping` cannot express, one line each: q, k and v
    share one qkv tensor (all FP8 or none), and one config.json serves every pipeline stage, so a
    local module name excluded on one stage is excluded on all."""
    if not spec.quant.fp8:
        return []
    problems = []
    excluded = set(excluded_modules(spec, mapping))
    for ref, module in _stage_linears(spec, mapping):
        if is_fp8(spec, ref) and module in excluded:
            problems.append(f"{module_name(ref)} is FP8 but TRT-LLM module {module} (its name at its pipeline stage) "
                            f"is excluded from quantization elsewhere: q/k/v must be quantized alike, and at pp > 1 a "
                            f"layer-specific exclude_modules entry applies to that local index on every stage")
    return problems


def hf_excludes(spec: ModelSpec, mapping: Mapping, patterns: list[str] | None) -> tuple[str, ...]:
    """The HF modules a TRT-LLM checkpoint's `exclude_modules` leaves unquantized (None: TRT-LLM's
    defaults), matched as trtllm-build matches them: fnmatch on the module name at its stage."""
    pats = TRTLLM_DEFAULT_EXCLUDES if patterns is None else tuple(patterns)
    return tuple(sorted({module_name(ref) for ref, module in _stage_linears(spec, mapping)
                         if any(fnmatchcase(module, p) for p in pats)}))


def plan_checkpoint(spec: ModelSpec, mapping: Mapping) -> list[RankPlan]:
    spec.refuse_unsupported(TRTLLM_STAGE)  # no parallel blocks nor plain MLPs in nemotron_nas
    return [plan_rank(spec, mapping, r) for r in mapping.ranks()]


def source_refs(spec: ModelSpec) -> list[TensorRef]:
    """What the converter reads: the model's tensors (a tied lm_head reads the embedding)."""
    return model_tensors(spec)


def check_complete(spec: ModelSpec, mapping: Mapping, plans: list[RankPlan]) -> list[str]:
    """Every source tensor is used, each rank tensor is tiled exactly by its pieces, and the tp
    ranks of each stage together hold every row/column of every split tensor."""
    problems = check_name_table() + check_layout(spec, mapping)
    if problems:
        return problems
    used = {(p.piece.ref.role, p.piece.ref.layer) for plan in plans for p in plan.placements}
    problems += [f"source tensor {r.hf_name} is not used by any rank" for r in source_refs(spec)
                 if (r.role, r.layer) not in used]
    for plan in plans:
        problems += _check_tiling(plan)
    problems += _check_coverage(spec, mapping, plans)
    return problems


def _check_tiling(plan: RankPlan) -> list[str]:
    spans: dict[str, list[tuple[int, int]]] = {name: [(0, 1)] for name in plan.scales}  # computed, not placed
    for p in plan.placements:
        if tuple(p.piece.shape[1:]) != plan.tensors[p.name][1:]:
            return [f"rank {plan.rank}: {p.name}: piece {p.piece.shape} does not fit {plan.tensors[p.name]}"]
        spans.setdefault(p.name, []).append((p.row, p.row + p.rows))
    problems = []
    for name, shape in plan.tensors.items():
        edges = sorted(spans.get(name, []))
        pos = 0
        for a, b in edges:
            if a != pos:
                problems.append(f"rank {plan.rank}: {name}: rows {pos}..{a} not tiled exactly")
            pos = b
        if pos != shape[0]:
            problems.append(f"rank {plan.rank}: {name}: pieces fill {pos} of {shape[0]} rows")
    return problems


def _check_coverage(spec: ModelSpec, mapping: Mapping, plans: list[RankPlan]) -> list[str]:
    """Per source tensor and stage: the union of the tp ranks' shards is the whole tensor."""
    covered: dict[tuple[Role, int | None, int], set[int]] = {}
    size: dict[tuple[Role, int | None, int], int] = {}
    for plan in plans:
        for p in plan.placements:
            key = (p.piece.ref.role, p.piece.ref.layer, mapping.pp_rank(plan.rank))
            s: Shard = p.piece.shard
            dim_size = p.piece.ref.shape[s.dim] if s.dim is not None else 1
            rng = range(s.start, s.stop) if s.dim is not None else range(1)
            covered.setdefault(key, set()).update(rng)
            size[key] = dim_size
    return [f"stage {k[2]}: {k[0].value} of layer {k[1]}: tp ranks hold {len(v)} of {size[k]} slices"
            for k, v in covered.items() if len(v) != size[k]]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

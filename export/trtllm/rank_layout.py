"""Every rank file's tensors, and where each piece of each source tensor lands, before any write.

Placement and split come from `export.layout.rank_pieces` (which uses `export.sharding`); this
module only names the pieces (TRT-LLM names, local layer indices) and stacks packed parts (q, k, v)
into row ranges of one tensor. The converter, `--dry-run` and the rank-file reader all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from export.layout import Piece, check_layout, rank_pieces
from export.mapping import Mapping
from export.sharding import Shard
from export.spec import DTYPE_BYTES, TRTLLM_STAGE, ModelSpec, normalize_dtype
from export.tensors import Role, TensorRef, model_tensors
from export.trtllm.names import check_name_table, packed_parts, trtllm_name


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

    def nbytes(self, dtype: str) -> int:
        per = DTYPE_BYTES[normalize_dtype(dtype)]
        return sum(_numel(s) for s in self.tensors.values()) * per

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
        plan.placements.append(Placement(piece, rank, name, row))
    return plan


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
    spans: dict[str, list[tuple[int, int]]] = {}
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

"""Which piece of which tensor each rank of a TP x PP layout holds.

The TRT-LLM writer, `inspect`'s per-rank bytes and the runtime's loaders all ask this one
function, so they cannot disagree about placement.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.errors import ExportError
from export.mapping import Mapping
from export.sharding import Shard, check_tp, shard_for
from export.spec import DTYPE_BYTES, ModelSpec, normalize_dtype
from export.tensors import Role, TensorRef, model_tensors


@dataclass(frozen=True)
class Piece:
    ref: TensorRef
    shard: Shard

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shard.shape(self.ref.shape)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def check_layout(spec: ModelSpec, mapping: Mapping) -> list[str]:
    problems = check_tp(spec, mapping.tp)
    if spec.num_layers % mapping.pp:
        problems.append(f"pp={mapping.pp} does not divide the {spec.num_layers} layers")
    return problems


def require_layout(spec: ModelSpec, mapping: Mapping) -> None:
    problems = check_layout(spec, mapping)
    if problems:
        raise ExportError(f"cannot split this model at tp={mapping.tp}, pp={mapping.pp}:\n  - "
                          + "\n  - ".join(problems))


def on_rank(ref: TensorRef, spec: ModelSpec, mapping: Mapping, rank: int) -> bool:
    if ref.role is Role.EMBED:
        return mapping.is_first_stage(rank)
    if ref.role in (Role.FINAL_NORM, Role.LM_HEAD):
        return mapping.is_last_stage(rank)
    return ref.layer in mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank))


def lm_head_ref(spec: ModelSpec) -> TensorRef:
    return TensorRef(Role.LM_HEAD, None, (spec.vocab, spec.hidden))


def rank_pieces(spec: ModelSpec, mapping: Mapping, rank: int) -> list[Piece]:
    """The rank's tensors in checkpoint order. A tied lm_head still gets its own (padded) piece,
    since TRT-LLM's DeciLM always has an lm_head parameter on the last stage."""
    refs = model_tensors(spec)
    if spec.tie_embeddings:
        refs.append(lm_head_ref(spec))
    tp_rank = mapping.tp_rank(rank)
    return [Piece(r, shard_for(spec, r, tp_rank, mapping.tp))
            for r in refs if on_rank(r, spec, mapping, rank)]


def rank_bytes(spec: ModelSpec, mapping: Mapping, rank: int, dtype: str | None = None) -> int:
    per = DTYPE_BYTES[normalize_dtype(dtype or spec.dtype)]
    return sum(p.numel() for p in rank_pieces(spec, mapping, rank)) * per

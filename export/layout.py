"""Which piece of which tensor each rank of a TP x PP layout holds.

The TRT-LLM writer, `inspect`'s per-rank bytes and the runtime's loaders all ask this one
function, so they cannot disagree about placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from export.errors import ExportError
from export.mapping import Mapping
from export.quantization import FP8_DTYPE
from export.sharding import Shard, check_tp, kv_heads_per_rank, shard_for
from export.spec import DTYPE_BYTES, AttentionKind, ModelSpec, normalize_dtype
from export.tensors import Role, ScaleRef, TensorRef, model_tensors, scale_refs, stored_dtype, tied_tensors


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
    """What every target needs (the cpu engine runs any layout that passes): tp divides what it
    splits, and every pipeline stage gets at least one layer. pp need not divide the layer count:
    stages follow TRT-LLM's uneven split (`Mapping.pp_layers`)."""
    problems = check_tp(spec, mapping.tp, mapping.embedding_shard)
    if mapping.pp > spec.num_layers:
        problems.append(f"pp={mapping.pp} is more stages than the {spec.num_layers} layers")
    return problems


def layer_span(layers: range) -> str:
    return f"layer {layers.start}" if len(layers) == 1 else f"layers {layers.start}-{layers.stop - 1}"


def stages_without_attention(spec: ModelSpec, pp: int) -> list[int]:
    """Pipeline stages at pp that hold no full-attention layer (linear replacements keep no KV cache
    and do not count, as in TRT-LLM's `is_attention_layer`)."""
    attention = set(spec.attention_layers())
    return [s for s, layers in enumerate(Mapping(1, pp).stages(spec.num_layers)) if not attention.intersection(layers)]


def trtllm_pp_values(spec: ModelSpec) -> list[int]:
    """Every pp at which each stage holds a full-attention layer: what trtllm-build can build."""
    return [pp for pp in range(1, spec.num_layers + 1) if not stages_without_attention(spec, pp)]


def nearest_trtllm_pp(spec: ModelSpec, pp: int) -> list[int]:
    """The buildable pp values closest to `pp`: the nearest below and the nearest above it."""
    ok = trtllm_pp_values(spec)
    below, above = [v for v in ok if v < pp], [v for v in ok if v > pp]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def check_trtllm_stages(spec: ModelSpec, mapping: Mapping) -> list[str]:
    """What trtllm-build adds: every stage needs a full-attention layer. TRT-LLM's
    `GenerationMixin.prepare_attention_inputs` (tensorrt_llm/models/generation_mixin.py) takes
    `attn_layer_idx.index(local_attn_layers[0])`, an IndexError on a stage without one."""
    if mapping.pp > spec.num_layers:
        return []  # check_layout reports it
    bad = stages_without_attention(spec, mapping.pp)
    if not bad:
        return []
    stages = mapping.stages(spec.num_layers)
    where = ", ".join(f"stage {s} ({layer_span(stages[s])})" for s in bad)
    near = nearest_trtllm_pp(spec, mapping.pp)
    hint = (f"nearest pp {'values that work' if len(near) > 1 else 'that works'}: " + ", ".join(map(str, near))
            if near else "no pp value works: the model has no full-attention layer")
    return [f"{where} {'has' if len(bad) == 1 else 'have'} no full-attention layer, "
            f"which trtllm-build cannot build (TRT-LLM needs one per pipeline stage); {hint}"]


def require_layout(spec: ModelSpec, mapping: Mapping, *, trtllm: bool = False) -> None:
    """Refuse a layout the target cannot run; `trtllm` adds what trtllm-build needs of the stages."""
    problems = check_layout(spec, mapping) + (check_trtllm_stages(spec, mapping) if trtllm else [])
    if len(problems) == 1:
        raise ExportError(f"cannot split this model at tp={mapping.tp}, pp={mapping.pp}: {problems[0]}")
    if problems:
        raise ExportError(f"cannot split this model at tp={mapping.tp}, pp={mapping.pp}:\n  - "
                          + "\n  - ".join(problems))


def on_rank(ref: TensorRef, spec: ModelSpec, mapping: Mapping, rank: int) -> bool:
    if ref.role is Role.EMBED:
        return mapping.is_first_stage(rank)
    if ref.role in (Role.FINAL_NORM, Role.LM_HEAD):
        return mapping.is_last_stage(rank)
    return ref.layer in mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank))


def rank_pieces(spec: ModelSpec, mapping: Mapping, rank: int) -> list[Piece]:
    """The rank's tensors in checkpoint order. A tied lm_head still gets its own (padded) piece,
    read from the embedding it aliases, since TRT-LLM's DeciLM always has an lm_head parameter on
    the last stage."""
    refs = model_tensors(spec) + tied_tensors(spec)
    tp_rank = mapping.tp_rank(rank)
    return [Piece(r, shard_for(spec, r, tp_rank, mapping.tp, mapping.embedding_shard))
            for r in refs if on_rank(r, spec, mapping, rank)]


# Bytes per stored value: the model dtypes, and float8_e4m3fn for the linears an FP8 checkpoint
# quantizes (`tensors.stored_dtype`). A per-tensor scale is one float32.
STORED_BYTES = {**DTYPE_BYTES, FP8_DTYPE: 1}
SCALE_BYTES = 4


def rank_bytes(spec: ModelSpec, mapping: Mapping, rank: int, dtype: str | None = None) -> int:
    """The rank's weight bytes, one rule for every precision: each piece at its stored dtype
    (`tensors.stored_dtype`: float8_e4m3fn for an FP8 linear, else `dtype` or the model's), plus
    the float32 per-tensor scales the rank keeps (`rank_scales`: not sharded, every rank a copy)."""
    spec = spec.with_dtype(dtype) if dtype else spec
    pieces = sum(p.numel() * STORED_BYTES[stored_dtype(spec, p.ref)] for p in rank_pieces(spec, mapping, rank))
    return pieces + SCALE_BYTES * len(rank_scales(spec, mapping, rank))


def rank_scales(spec: ModelSpec, mapping: Mapping, rank: int) -> list[ScaleRef]:
    """The scales of the rank's FP8 linears and of its stage's FP8 KV cache, as the ModelOpt
    checkpoint names them (`tensors.scale_refs`: a weight and an input scale per linear, a k and a
    v scale per attention)."""
    if spec.quant.is_none:
        return []
    held = {(p.ref.role, p.ref.layer, p.ref.branch) for p in rank_pieces(spec, mapping, rank)}
    return [s for s in scale_refs(spec) if (s.role, s.layer, s.branch) in held]


def sync_points_per_token(spec: ModelSpec, mapping: Mapping) -> int:
    """What one token's forward pass waits on at this layout: the tp collectives
    (`ModelSpec.sync_points_per_token`, plus the lookup's collective when the embedding is split;
    none at tp 1) and a stage hand-off between consecutive pipeline stages."""
    tp = spec.sync_points_per_token() + int(mapping.parallel_embedding) if mapping.tp > 1 else 0
    return tp + mapping.pp - 1


def rank_kv_heads(spec: ModelSpec, mapping: Mapping, rank: int) -> dict[Any, int]:
    """Global layer (or (layer, branch) of a parallel_blocks branch) -> kv heads the rank caches, for the
    full-attention layers of its stage
    (`ceil(kv / tp)`: a head duplicated when tp exceeds the layer's kv heads)."""
    stage = mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank))
    heads: dict = {i: kv_heads_per_rank(spec.layers[i].attention.kv_heads, mapping.tp)  # type: ignore[arg-type]
                   for i in spec.attention_layers() if i in stage}
    # a parallel_blocks branch with attention caches under (layer, branch)
    heads.update({(i, k): kv_heads_per_rank(b.attention.kv_heads, mapping.tp)  # type: ignore[arg-type]
                  for i in stage for k, b in enumerate(spec.layers[i].branches)
                  if b.attention.kind is AttentionKind.FULL})
    return heads


def rank_kv_bytes_per_token(spec: ModelSpec, mapping: Mapping, rank: int, dtype: str | None = None) -> int:
    """K and V the rank caches per token (what the runtime's KVCache allocates per position): at
    1 byte a value for an FP8 KV cache (`spec.quant.fp8_kv`, TRT-LLM's `kv_cache_quant_algo` FP8),
    else at `dtype` or the model's."""
    per = STORED_BYTES[FP8_DTYPE] if spec.quant.fp8_kv else DTYPE_BYTES[normalize_dtype(dtype or spec.dtype)]
    return sum(2 * heads * spec.head_dim * per for heads in rank_kv_heads(spec, mapping, rank).values())

"""How each tensor is split across tensor-parallel ranks: pure functions, one source of truth.

The TRT-LLM writer slices full tensors with these rules and the reference runtime reads its
rank's slice with the very same rules, so a layout bug shows up as a logits mismatch.
Conventions follow TRT-LLM's DeciLM converter: q by heads, k/v by kv heads with duplication when
tp exceeds a layer's kv heads, o_proj/down_proj row-parallel (dim 1), gate/up column-parallel
(dim 0), lm_head zero-padded to a multiple of tp then split on dim 0, norms whole, and the
embedding whole unless vocab-parallel (TRT-LLM's `use_parallel_embedding`; see `embedding_shard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from export.spec import ModelSpec
from export.tensors import Role, TensorRef, model_tensors

COLUMN = {Role.GATE, Role.UP, Role.LINEAR_ATTN, Role.LINEAR_FFN}
ROW = {Role.O, Role.DOWN}
REPLICATED = {Role.ATTN_NORM, Role.FFN_NORM, Role.FINAL_NORM}


@dataclass(frozen=True)
class Shard:
    """Rows/columns [start, stop) of the full tensor along `dim`, then `pad` zero rows.

    `dim` None means the rank holds the whole tensor.
    """

    dim: int | None
    start: int = 0
    stop: int = 0
    pad: int = 0

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full)
        out = list(full)
        out[self.dim] = self.stop - self.start + self.pad
        return tuple(out)


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """`ceil(kv / tp)`: 1 when heads are duplicated."""
    return -(-kv_heads // tp)


def kv_head_range(kv_heads: int, tp: int, rank: int) -> range:
    """Which of the layer's kv heads rank `rank` holds."""
    if tp >= kv_heads:
        return range(rank // (tp // kv_heads), rank // (tp // kv_heads) + 1)
    n = kv_heads // tp
    return range(rank * n, (rank + 1) * n)


def _even(size: int, rank: int, tp: int, dim: int) -> Shard:
    n = size // tp
    return Shard(dim, rank * n, (rank + 1) * n)


def _vocab_rows(vocab: int, rank: int, tp: int, dim: int = 0) -> Shard:
    """`ceil(vocab / tp)` rows per rank, the last rank's tail zero-padded (lm_head, and the
    vocab-split embedding)."""
    rows = padded_vocab(vocab, tp) // tp
    start, stop = min(rank * rows, vocab), min((rank + 1) * rows, vocab)
    return Shard(dim, start, stop, rows - (stop - start))


def embedding_shard(spec: ModelSpec, ref: TensorRef, rank: int, tp: int, dim: int | None) -> Shard:
    """TRT-LLM's vocab-parallel embedding (`layers/embedding.py` `Embedding`): dim 0 gives each rank
    `ceil(vocab / tp)` rows (the parameter's shape; its lookup zeroes ids outside the rank's rows and
    all-reduces), the last rank zero-padded as TRT-LLM's GPT converters pad (`pad_vocab_size`);
    dim 1 gives each rank `hidden // tp` columns (lookup, then all-gather on the last dim)."""
    if dim is None or tp == 1:
        return Shard(None)
    if dim == 0:
        return _vocab_rows(ref.shape[0], rank, tp)
    return _even(ref.shape[1], rank, tp, 1)


def shard_for(spec: ModelSpec, ref: TensorRef, rank: int, tp: int, embedding: int | None = None) -> Shard:
    """The piece of `ref` that tensor-parallel rank `rank` of `tp` holds; `embedding` is the
    embedding's sharding dim (None: whole on every rank, TRT-LLM's default)."""
    role = ref.role
    if role is Role.EMBED:
        return embedding_shard(spec, ref, rank, tp, embedding)
    if tp == 1 or role in REPLICATED:
        return Shard(None)
    if role is Role.Q:
        return _even(ref.shape[0], rank, tp, 0)
    if role in (Role.K, Role.V):
        lay = spec.layers[ref.layer]  # type: ignore[index]
        kv = (lay.branches[ref.branch] if ref.branch is not None else lay).attention.kv_heads
        heads = kv_head_range(kv, tp, rank)
        return Shard(0, heads.start * spec.head_dim, heads.stop * spec.head_dim)
    if role in COLUMN:
        return _even(ref.shape[0], rank, tp, 0)
    if role in ROW:
        return _even(ref.shape[1], rank, tp, 1)
    if role is Role.LM_HEAD:
        return _vocab_rows(ref.shape[0], rank, tp)
    raise AssertionError(f"no sharding rule for role {role}")


def take(source: Any, shard: Shard, full_shape: tuple[int, ...]) -> torch.Tensor:
    """Apply `shard` to a full tensor or a lazy safetensors slice (reading only that piece)."""
    if shard.dim is None:
        return source[...] if not isinstance(source, torch.Tensor) else source
    index = tuple(slice(shard.start, shard.stop) if d == shard.dim else slice(None)
                  for d in range(len(full_shape)))
    piece = source[index]
    if shard.pad:
        pad_shape = list(piece.shape)
        pad_shape[shard.dim] = shard.pad
        piece = torch.cat([piece, piece.new_zeros(pad_shape)], dim=shard.dim)
    return piece


def check_tp(spec: ModelSpec, tp: int, embedding: int | None = None) -> list[str]:
    """Every reason `tp` cannot split this model, naming the layer at fault."""
    problems: list[str] = []
    if embedding == 1 and spec.hidden % tp:
        problems.append(f"tp={tp} does not divide hidden_size={spec.hidden} (embedding sharding dim 1)")
    if spec.heads % tp:
        problems.append(f"tp={tp} does not divide num_attention_heads={spec.heads}")
    if spec.hidden % tp and any(r.role in (Role.LINEAR_ATTN, Role.LINEAR_FFN) for r in model_tensors(spec)):
        problems.append(f"tp={tp} does not divide hidden_size={spec.hidden} (linear layers)")
    for i, lay in enumerate(spec.layers):
        kv = lay.attention.kv_heads
        if kv is not None and kv % tp and tp % kv:
            problems.append(f"layer {i}: tp={tp} and {kv} kv heads: neither divides the other")
        if lay.ffn.width is not None and lay.ffn.width % tp:
            problems.append(f"layer {i}: tp={tp} does not divide FFN width {lay.ffn.width}")
        problems += [f"layer {i} parallel_blocks.{k}: tp={tp} does not divide FFN width {b.ffn.width}"
                     for k, b in enumerate(lay.branches) if b.ffn.width is not None and b.ffn.width % tp]
        problems += [f"layer {i} parallel_blocks.{k}: tp={tp} and {b.attention.kv_heads} kv heads: neither "
                     f"divides the other" for k, b in enumerate(lay.branches)
                     if b.attention.kv_heads is not None and b.attention.kv_heads % tp and tp % b.attention.kv_heads]
    return problems


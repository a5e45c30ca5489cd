"""Test oracles: TRT-LLM's rules written out a second, independent way, to check ours against.

`split` / `dup_kv` are TRT-LLM's converter helpers (`split`, `dup_kv_weight`) as it applies them to
full tensors; `expected_shapes` is every rank file's tensor shapes derived by hand from the spec.
Production code derives the same facts from `export.sharding` / `export.layout`; these exist only
so a test can compare the two.
"""

from __future__ import annotations

import torch

from export.mapping import Mapping
from export.sharding import kv_heads_per_rank, padded_vocab
from export.spec import AttentionKind, ModelSpec


def split(tensor: torch.Tensor, rank: int, tp: int, dim: int) -> torch.Tensor:
    """TRT-LLM's `split`: equal chunks, the size must divide."""
    size = tensor.shape[dim]
    if size % tp:
        raise ValueError(f"dimension {dim} of size {size} is not divisible by tp={tp}")
    return tensor.narrow(dim, rank * (size // tp), size // tp)


def dup_kv(weight: torch.Tensor, kv_heads: int, tp: int) -> torch.Tensor:
    """TRT-LLM's `dup_kv_weight`: repeat each kv head's rows tp // kv times, contiguously."""
    if tp % kv_heads:
        raise ValueError(f"tp={tp} is not a multiple of {kv_heads} kv heads")
    reps = tp // kv_heads
    head_dim = weight.shape[0] // kv_heads
    w = weight.reshape(kv_heads, 1, head_dim, -1).expand(kv_heads, reps, head_dim, weight.shape[-1])
    return w.reshape(kv_heads * reps * head_dim, -1)



def expected_shapes(spec: ModelSpec, mapping: Mapping, rank: int) -> dict[str, tuple[int, ...]]:
    """The contract's shapes written out directly (not via the plan or the layout): a second
    opinion on `plan_checkpoint` and `--dry-run`."""
    tp, h, hd = mapping.tp, spec.hidden, spec.head_dim
    stage = mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank))
    out: dict[str, tuple[int, ...]] = {}
    if mapping.is_first_stage(rank):
        emb = {None: (spec.vocab, h), 0: (padded_vocab(spec.vocab, tp) // tp, h), 1: (spec.vocab, h // tp)}
        out["transformer.vocab_embedding.weight"] = emb[mapping.embedding_shard if tp > 1 else None]
    for i, g in enumerate(stage):
        lay, pre = spec.layers[g], f"transformer.layers.{i}."
        if lay.attention.kind is AttentionKind.FULL:
            kv = kv_heads_per_rank(lay.attention.kv_heads, tp)  # type: ignore[arg-type]
            out[pre + "input_layernorm.weight"] = (h,)
            out[pre + "attention.qkv.weight"] = ((spec.heads // tp + 2 * kv) * hd, h)
            out[pre + "attention.dense.weight"] = (h, spec.heads * hd // tp)
        elif lay.attention.kind is AttentionKind.LINEAR:
            out[pre + "input_layernorm.weight"] = (h,)
            out[pre + "attention.weight"] = (h // tp, h)
        if lay.ffn.width is not None:
            w = lay.ffn.width // tp
            out[pre + "post_layernorm.weight"] = (h,)
            out.update({pre + "ffn.fc.weight": (w, h), pre + "ffn.gate.weight": (w, h),
                        pre + "ffn.proj.weight": (h, w)})
        elif lay.has_ffn:
            out[pre + "post_layernorm.weight"] = (h,)
            out[pre + "ffn.weight"] = (h // tp, h)
    if mapping.is_last_stage(rank):
        out["transformer.ln_f.weight"] = (h,)
        out["lm_head.weight"] = (padded_vocab(spec.vocab, tp) // tp, h)
    return out


# TRT-LLM rank-file linears an FP8 checkpoint stores in float8_e4m3fn (ModelOpt's recipe: every
# linear but lm_head), and how many HF ModelOpt linears each stands for (their weight_scale +
# input_scale pairs: q, k and v for the fused qkv).
FP8_LINEARS = {"attention.qkv.weight": 3, "attention.dense.weight": 1, "attention.weight": 1,
               "ffn.fc.weight": 1, "ffn.gate.weight": 1, "ffn.proj.weight": 1, "ffn.weight": 1}


def fp8_rank_bytes(spec: ModelSpec, mapping: Mapping, rank: int, *, fp8_kv: bool, dtype_bytes: int = 2) -> int:
    """A rank's bytes with FP8 linears, from `expected_shapes` (not the layout): each quantized
    linear at 1 byte a weight plus 4 + 4 bytes of float32 scales per HF linear it holds, everything
    else at `dtype_bytes`, and with an FP8 KV cache a k and a v scale (4 bytes each) per
    full-attention layer of the rank's stage."""
    total = 0
    for name, shape in expected_shapes(spec, mapping, rank).items():
        numel = 1
        for d in shape:
            numel *= d
        in_layer = ".".join(name.split(".")[3:]) if name.startswith("transformer.layers.") else None
        linears = FP8_LINEARS.get(in_layer, 0)
        total += numel + 8 * linears if linears else numel * dtype_bytes
    if fp8_kv:
        stage = mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank))
        total += 8 * sum(1 for i in stage if spec.layers[i].attention.kind is AttentionKind.FULL)
    return total

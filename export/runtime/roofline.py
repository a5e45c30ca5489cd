"""A roofline estimate of one batch-1 decode step, so `bench decode` can say how much is overhead.

Arithmetic time per token = max(FLOPs / matmul GFLOP/s, bytes / memory GB/s), with FLOPs and
bytes from the spec (every matmul weight read once, the lm_head included even when tied, plus
the attention over the context's keys/values) and both rates measured on this machine in the same
run. The memory rate is measured over a buffer the size of the weights, so it sees the same cache
hierarchy the decode step does. What the step takes beyond that is per-step overhead: dispatch,
copies, Python between layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from export.spec import DTYPE_BYTES, AttentionKind, ModelSpec
from export.tensors import Role, model_tensors


@dataclass(frozen=True)
class Machine:
    matmul_gflops: float   # fp32 GEMM, the bench's threads
    memory_gbps: float     # streaming read over a weights-sized buffer


def matmul_params(spec: ModelSpec) -> int:
    """Weights a decode token multiplies by: every 2-D tensor but the embedding, plus the lm_head."""
    skip = (Role.EMBED, Role.LM_HEAD)
    own = sum(r.numel() for r in model_tensors(spec) if len(r.shape) == 2 and r.role not in skip)
    return own + spec.vocab * spec.hidden


def attention_layers(spec: ModelSpec) -> list[int]:
    """q-heads of each full attention (branches included)."""
    out = []
    for lay in spec.layers:
        for part in (lay.branches or (lay,)):
            if part.attention.kind is AttentionKind.FULL:
                out.append(spec.heads)
    return out


def decode_cost(spec: ModelSpec, context: int, dtype: str = "float32") -> tuple[float, float]:
    """(FLOPs, bytes) of one token at batch 1 with `context` tokens already cached."""
    params = matmul_params(spec)
    attn_flops = sum(4 * heads * spec.head_dim * context for heads in attention_layers(spec))
    kv_bytes = context * spec.kv_cache_bytes_per_token(dtype)
    return 2.0 * params + attn_flops, float(params * DTYPE_BYTES[dtype] + kv_bytes)


def _best_seconds(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def measure_machine(weight_bytes: int, repeats: int = 20) -> Machine:
    """Best-of-`repeats` GEMM rate and streaming-read rate (at torch's current thread count)."""
    n = 384
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    gflops = 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
    buf = torch.ones(max(weight_bytes // 4, 1 << 16))
    buf.sum()
    gbps = buf.numel() * 4 / _best_seconds(lambda: buf.sum(), repeats) / 1e9
    return Machine(gflops, gbps)


def arithmetic_ms(spec: ModelSpec, context: int, machine: Machine, dtype: str = "float32") -> float:
    """The roofline time of one batch-1 token, in ms."""
    flops, nbytes = decode_cost(spec, context, dtype)
    return 1e3 * max(flops / (machine.matmul_gflops * 1e9), nbytes / (machine.memory_gbps * 1e9))

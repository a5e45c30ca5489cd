"""FP8 E4M3 numerics: one definition for every stage.

`quantize` writes with them, `fuse` and `convert` requantize with them, and the reference runtime
emulates TRT-LLM's per-tensor FP8 GEMM with them (quantize the input with its scale, multiply the
E4M3 values in fp32, scale the product), so the CPU reproduces what the GPU computes up to fp32
summation order. torch's `float8_e4m3fn` does the rounding (nearest even) on the CPU.
"""

from __future__ import annotations

import math

import torch

from export.quantization import FP8_MAX


def scale_for(amax: float | torch.Tensor) -> float:
    """Per-tensor scale as ModelOpt computes it: amax / 448 (an all-zero tensor gets a tiny
    positive scale, so every scale is finite and > 0 as loaders require)."""
    a = float(amax)
    if not math.isfinite(a):
        raise ValueError(f"amax {a} is not finite")
    return max(a, 1e-12) / FP8_MAX


def quantize(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x / scale rounded to E4M3 (round to nearest even), saturated to +-448 (as TRT-LLM's and
    ModelOpt's quantizers saturate, never producing NaN)."""
    return (x.float() / float(scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize(q: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return q.float() * float(scale)


def round_trip(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x as the E4M3 grid of `scale` holds it, in fp32: the emulated storage of an FP8 value."""
    return quantize(x, scale).float() * float(scale)


def requantize(q: torch.Tensor, scale: float, new_scale: float) -> torch.Tensor:
    """FP8 values of `scale` re-expressed at `new_scale` (>= scale: the max of a fused group's
    scales, as TRT-LLM does for q/k/v and gate+fc); exact when the scales are equal."""
    return q if scale == new_scale else quantize(q.float() * scale, new_scale)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: float, in_scale: float) -> torch.Tensor:
    """TRT-LLM's per-tensor FP8 GEMM, emulated: the input quantized with its activation scale,
    the E4M3 products summed in fp32 (`w` holds the weight's E4M3 values as fp32), then scaled by
    in_scale * w_scale; returned in the input's dtype."""
    xq = quantize(x, in_scale).float()
    return (torch.nn.functional.linear(xq, w) * (in_scale * w_scale)).to(x.dtype)

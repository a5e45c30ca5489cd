"""Rotary position embedding, neox style (rotate half), with Llama-3 frequency scaling.

Written from the Llama-3 recipe (as HF's `_compute_llama3_parameters` and TRT-LLM's
`rope_gpt_neox` + llama3 scaling compute it) so logits match transformers to fp32 rounding.
"""

from __future__ import annotations

import math

import torch

from export.spec import ModelSpec, RopeScaling


def inv_freq(spec: ModelSpec) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, scaled when the spec carries llama3 scaling."""
    dim = spec.head_dim
    base = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return _llama3(base, spec.rope_scaling) if spec.rope_scaling else base


def _llama3(freq: torch.Tensor, rs: RopeScaling) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, the band between interpolated."""
    old = rs.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / rs.factor, freq)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, 1, head_dim] for integer positions [B, T] (computed in fp32)."""
    angles = positions.to(torch.float32)[..., None] * freq.to(positions.device)
    emb = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, head_dim] rotated; the two halves of head_dim form the pairs (neox)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

"""The "torch-fast" runtime: the reference Decoder's weights, a forward step with little per-step overhead.

At batch 1 on the demo model the reference `Stepper` spends most of a decode step outside the
arithmetic: ~35 small ops per layer (three q/k/v and two gate/up matmuls, RoPE recomputed from
the frequencies per layer, a cache write by advanced indexing followed by a gather of the slots'
whole history). Here, per step, the positions' cos/sin come from one table lookup and the mask is
built once; per layer one fused qkv matmul, one fused gate-up matmul, `F.rms_norm`, and k/v are
written in place into the preallocated `KVCache` and attended through a view when the slots are
contiguous (the scheduler's usual case), so nothing is copied. Same weights (the fused matrices
are concatenations made once at start), same math as `model.py`: parity within fp32 rounding.

tp = pp = 1 only (the collectives and pipeline plumbing stay in the reference Stepper); a
parallel_blocks layer runs through the reference `Decoder.block` on the same cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from export.errors import ExportError
from export.io.safetensors_format import torch_dtype
from export.layout import require_layout
from export.mapping import Mapping
from export.runtime.backends import Backend, LocalBackend
from export.runtime.cache import KVCache
from export.runtime.model import Decoder, load_decoder
from export.runtime.steps import Stepper
from export.sources import open_source
from export.spec import AttentionKind, FFNKind, ModelSpec, normalize_dtype
from export.tensors import Role

Sublayer = Callable[[torch.Tensor, "StepContext"], torch.Tensor]


class StepContext:
    """What every layer of one forward step shares: positions, rotary cos/sin, the mask, the slots."""

    def __init__(self, table: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                 slots: torch.Tensor | None, cache: KVCache | None) -> None:
        self.positions, self.slots, self.cache = positions, slots, cache
        cos, sin = table
        self.cos, self.sin = cos[positions][:, :, None, :], sin[positions][:, :, None, :]  # [B, T, 1, hd]
        self.span = int(positions.max()) + 1
        key_pos = torch.arange(self.span)
        self.mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
        self.block: slice | None = None  # the slots as one slice when they are contiguous (a view, no gather)
        if slots is not None:
            lo, n = int(slots[0]), slots.shape[0]
            if bool((slots == torch.arange(lo, lo + n)).all()):
                self.block = slice(lo, lo + n)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """neox RoPE (rope.apply's math): the halves of head_dim form the pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class FastModel:
    """Per-layer closures over fused weights, built once from a loaded tp=1 `Decoder`."""

    def __init__(self, dec: Decoder) -> None:
        self.dec, self.spec, self.eps = dec, dec.spec, dec.spec.norm_eps
        self.sublayers: list[tuple[int, Sublayer | None, Sublayer | None]] = []
        for i in dec.local_layers:
            lay = self.spec.layers[i]
            if lay.branches:
                self.sublayers.append((i, None, None))  # the reference block, on the same cache
                continue
            attn, ffn = self._attention(i, lay.attention.kind), self._ffn(i, lay.ffn.kind, lay.ffn.gated)
            self.sublayers.append((i, attn, ffn))
        self.table = self._rope_table()

    def _rope_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [max_pos, head_dim] in fp32 math, as rope.cos_sin computes them per step."""
        positions = torch.arange(self.spec.max_position_embeddings, dtype=torch.float32)
        angles = positions[:, None] * self.dec.inv_freq
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(self.dec.dtype), emb.sin().to(self.dec.dtype)

    def _norm(self, role: Role, i: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        w, eps, shape = self.dec.w(role, i), self.eps, (self.spec.hidden,)
        if self.dec.dtype != torch.float32:  # HF's order: normalise in fp32, cast, then scale
            return lambda x: w * F.rms_norm(x.float(), shape, eps=eps).to(x.dtype)
        return lambda x: F.rms_norm(x, shape, w, eps)

    def _linear(self, norm_role: Role, role: Role, i: int) -> Sublayer:
        """A sublayer replaced by one linear map (Puzzle's `replace_with_linear`), after its norm."""
        norm, lin = self._norm(norm_role, i), self.dec.w(role, i)
        return lambda h, ctx: F.linear(norm(h), lin)

    def _attention(self, i: int, kind: AttentionKind) -> Sublayer | None:
        if kind is AttentionKind.NOOP:
            return None
        if kind is AttentionKind.LINEAR:
            return self._linear(Role.ATTN_NORM, Role.LINEAR_ATTN, i)
        norm, w = self._norm(Role.ATTN_NORM, i), self.dec.w
        heads, kvh, hd = self.dec.local_heads, self.dec.kv_local[i], self.spec.head_dim
        qkv = torch.cat([w(Role.Q, i), w(Role.K, i), w(Role.V, i)])
        wo, sizes, gqa = w(Role.O, i), (heads * hd, kvh * hd, kvh * hd), heads != kvh

        def attend(h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            b, t, _ = h.shape
            q, k, v = F.linear(norm(h), qkv).split(sizes, dim=-1)
            q = _rotate(q.view(b, t, heads, hd), ctx.cos, ctx.sin).transpose(1, 2)
            k = _rotate(k.view(b, t, kvh, hd), ctx.cos, ctx.sin).transpose(1, 2)
            v = v.view(b, t, kvh, hd).transpose(1, 2)
            keys, values = _cached(ctx, i, k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, enable_gqa=gqa)
            return F.linear(out.transpose(1, 2).reshape(b, t, heads * hd), wo)
        return attend

    def _ffn(self, i: int, kind: FFNKind, gated: bool) -> Sublayer | None:
        if kind is FFNKind.NOOP:
            return None
        if kind is FFNKind.LINEAR:
            return self._linear(Role.FFN_NORM, Role.LINEAR_FFN, i)
        norm, w = self._norm(Role.FFN_NORM, i), self.dec.w
        down = w(Role.DOWN, i)
        if not gated:
            up = w(Role.UP, i)
            return lambda h, ctx: F.linear(F.silu(F.linear(norm(h), up)), down)
        gate_up, width = torch.cat([w(Role.GATE, i), w(Role.UP, i)]), w(Role.UP, i).shape[0]

        def swiglu(h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            g, u = F.linear(norm(h), gate_up).split(width, dim=-1)
            return F.linear(F.silu(g) * u, down)
        return swiglu

    def layers(self, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        for i, attn, ffn in self.sublayers:
            if attn is None and ffn is None and self.spec.layers[i].branches:
                h = self.dec.block(i, h, ctx.positions, ctx.cache, ctx.slots)
                continue
            if attn is not None:
                h = h + attn(h, ctx)
            if ffn is not None:
                h = h + ffn(h, ctx)
        return h


def _cached(ctx: StepContext, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k/v [B, kvh, T, hd] at the step's positions; the slots' keys/values up to the span."""
    if ctx.cache is None:
        return k, v
    ck, cv = ctx.cache.k[layer], ctx.cache.v[layer]
    pos = ctx.positions
    if ctx.block is not None and pos.shape[1] == 1:  # decode into contiguous slots: in place, views only
        rows = ck[ctx.block]
        idx = pos[:, None, :, None].expand(-1, k.shape[1], 1, k.shape[3])
        rows.scatter_(2, idx, k)
        cv[ctx.block].scatter_(2, idx, v)
        return rows[:, :, :ctx.span], cv[ctx.block][:, :, :ctx.span]
    return ctx.cache.write(layer, ctx.slots, pos, k.transpose(1, 2), v.transpose(1, 2))  # type: ignore[arg-type]


class FastStepper(Stepper):
    """The step protocol of `Stepper` (same cache, same commands); `extend` runs `FastModel`."""

    def __init__(self, decoder: Decoder) -> None:
        if decoder.mapping.world_size != 1:
            raise ExportError("runtime torch-fast runs tp = pp = 1 only; use --runtime torch")
        super().__init__(decoder)
        self.fast = FastModel(decoder)

    def extend(self, slots: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor,
               start: torch.Tensor) -> torch.Tensor | None:
        positions = start[:, None] + torch.arange(ids.shape[1])
        ctx = StepContext(self.fast.table, positions, slots, self.cache)
        h = self.fast.layers(self.dec.embed(ids), ctx)
        return self._last_logits(h, lens)


def start_fast(source: Path, *, tp: int | None, pp: int | None, dtype: str, threads: int,
               python: str | None) -> tuple[ModelSpec, Mapping, Backend]:
    """The registry's start function: one rank in this process (tp = pp = 1)."""
    dtype = normalize_dtype(dtype)
    spec, own, make = open_source(Path(source))
    mapping = Mapping(tp or 1, pp or 1)
    if mapping.world_size != 1 or (own is not None and own.world_size != 1):
        raise ExportError(f"{source}: runtime torch-fast runs tp = pp = 1 only; use --runtime torch")
    require_layout(spec, mapping)
    return spec, mapping, LocalBackend(FastStepper(load_decoder(make(mapping, 0), dtype=torch_dtype(dtype))))

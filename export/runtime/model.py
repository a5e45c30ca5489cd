"""The heterogeneous decoder: one TP rank of one pipeline stage, built from the `ModelSpec`.

Per layer: pre-norm RMSNorm, then full attention (per-layer kv heads, GQA, neox RoPE with llama3
scaling) or a linear replacement or nothing; then a SwiGLU FFN of the layer's width, a linear
replacement or nothing. No-op sublayers have no parameters and no KV cache. Parameters are
created on the meta device and then replaced by the tensors `RankWeights` returns (already
sharded by `export.sharding`), so weights exist once. Under TP: one all-reduce after each
attention and each FFN, an all-gather after linear replacements (column-parallel,
gather_output as in TRT-LLM) and after the vocab-parallel lm_head; with a split embedding, one
more at the lookup (an all-reduce for vocab rows, an all-gather for hidden columns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from export import fp8, rope
from export.errors import CheckpointError
from export.layout import Piece, rank_kv_heads, rank_pieces, require_layout
from export.mapping import Mapping
from export.rank_weights import RankWeights
from export.runtime.cache import KVCache
from export.spec import CPU_RUNS, CPU_STAGE, AttentionKind, FFNKind, ModelSpec
from export.tensors import Role, ScaleKind, ScaleRef, is_fp8

GLOBAL = "global"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF Llama: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Decoder(nn.Module):
    """One TP rank of one PP stage (the whole model at tp = pp = 1)."""

    def __init__(self, spec: ModelSpec, mapping: Mapping, rank: int, dtype: torch.dtype = torch.float32,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        spec.refuse_unsupported(CPU_STAGE, **CPU_RUNS)
        require_layout(spec, mapping)
        self.spec, self.mapping, self.rank, self.group, self.dtype = spec, mapping, rank, group, dtype
        self.tp, self.tp_rank = mapping.tp, mapping.tp_rank(rank)
        self.local_layers = mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank))
        self.is_first, self.is_last = mapping.is_first_stage(rank), mapping.is_last_stage(rank)
        self.local_heads = spec.heads // self.tp
        self.kv_local = rank_kv_heads(spec, mapping, rank)  # parallel_blocks branches under (layer, branch)
        self._flat: dict[tuple, torch.Tensor] = {}  # plain-dict view: hot-path lookups
        self.params = nn.ModuleDict({GLOBAL: nn.ParameterDict()})
        for i in self.local_layers:
            self.params[str(i)] = nn.ParameterDict()
        for piece in rank_pieces(spec, mapping, rank):
            self._store(piece.ref.role, piece.ref.layer, torch.empty(piece.shape, dtype=dtype), piece.ref.branch)
        self.inv_freq = torch.empty(0)  # set after loading (not a parameter: computed, not read)
        self.sync_count = 0  # collectives issued; bench reads it to report sync points per token
        self._fp8: dict[tuple, tuple[float, float]] = {}  # FP8 linear -> (weight scale, input scale)
        self._kv_scale: dict[object, float] = {}  # attention (layer or (layer, branch)) -> FP8 KV scale
        self.observe: Callable[[object, torch.Tensor], None] | None = None

    # ---- parameters ----------------------------------------------------------------------
    def _store(self, role: Role, layer: int | None, t: torch.Tensor, branch: int | None = None) -> None:
        key = GLOBAL if layer is None else str(layer)
        param = nn.Parameter(t, requires_grad=False)
        self.params[key][role.value if branch is None else f"branch{branch}_{role.value}"] = param
        self._flat[(role, layer) if branch is None else (role, layer, branch)] = param

    def w(self, role: Role, layer: int | None = None, branch: int | None = None) -> torch.Tensor:
        return self._flat[(role, layer) if branch is None else (role, layer, branch)]

    def linear(self, x: torch.Tensor, role: Role, layer: int | None = None, branch: int | None = None) -> torch.Tensor:
        """x @ W^T for the rank's piece of (role, layer[, branch]); an FP8 linear runs TRT-LLM's
        per-tensor FP8 GEMM, emulated (`fp8.fp8_linear`). `observe` (calibration) sees every input."""
        key = (role, layer) if branch is None else (role, layer, branch)
        if self.observe is not None:
            self.observe(key, x)
        scales = self._fp8.get(key)
        if scales is None:
            return F.linear(x, self._flat[key])
        return fp8.fp8_linear(x, self._flat[key], *scales)

    def _kv_round(self, key: object, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 KV cache, emulated: k and v as E4M3 at the layer's one KV scale hold them (what
        TRT-LLM's kernels store and read back; the checkpoint has one scale per layer). `observe`
        (calibration) sees k (after RoPE) and v, keyed (ScaleKind.K | V, layer or (layer, branch))."""
        if self.observe is not None:
            self.observe((ScaleKind.K, key), k)
            self.observe((ScaleKind.V, key), v)
        scale = self._kv_scale.get(key)
        if scale is None:
            return k, v
        return fp8.round_trip(k, scale).to(k.dtype), fp8.round_trip(v, scale).to(v.dtype)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def new_cache(self, slots: int = 1, max_len: int = 64) -> KVCache:
        return KVCache(self.kv_local, self.spec.head_dim, self.dtype, self.device, slots, max_len)

    # ---- collectives ---------------------------------------------------------------------
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.group)
            self.sync_count += 1
        return x

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' column shards along the last dim (TRT-LLM gather_output)."""
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self.sync_count += 1
        return torch.cat(parts, dim=-1)

    # ---- the public pieces -----------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The lookup as TRT-LLM's `functional.embedding` does it for the rank's piece: whole; vocab
        rows (ids outside this rank's rows give zeros, then an all-reduce: one non-zero term per
        id, so the sum is exact); or hidden columns (all-gathered on the last dim)."""
        w = self.w(Role.EMBED)
        if not self.mapping.parallel_embedding:
            return F.embedding(input_ids, w)
        if self.mapping.embedding_shard == 1:
            return self._all_gather(F.embedding(input_ids, w))
        local = input_ids - self.tp_rank * w.shape[0]
        owned = (local >= 0) & (local < w.shape[0])
        x = F.embedding(torch.where(owned, local, 0), w) * owned.unsqueeze(-1).to(w.dtype)
        return self._all_reduce(x)

    def block(self, i: int, h: torch.Tensor, positions: torch.Tensor | None = None,
              cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Global layer `i` with its residuals. Without a cache: causal attention over the T tokens."""
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        lay = self.spec.layers[i]
        if lay.branches:
            return self._parallel_blocks(i, h, positions, cache, slots)
        h = h + ATTENTION[lay.attention.kind](self, i, h, positions, cache, slots)
        return h + FFN_IMPL[lay.ffn.kind](self, i, h)

    def _parallel_blocks(self, i: int, h: torch.Tensor, positions: torch.Tensor,
                         cache: KVCache | None, slots: torch.Tensor | None) -> torch.Tensor:
        """Puzzletron's `DeciLMMultiDecoderLayer`: sum_k branch_k(h) - (n-1) h, each branch an
        ordinary layer on the same input: h + sum_k (attn_k + FFN_k(norm_k(h + attn_k))).

        Row-parallel outputs are partial sums, so the branches share collectives: one all-reduce of
        the attention outputs that an FFN reads next (all such branches at once), then one of
        everything else summed: `Layer.sync_points`."""
        branches = self.spec.layers[i].branches
        attn = {k: self._attention(i, h, positions, cache, slots, branch=k, reduce=False)
                for k, b in enumerate(branches) if b.attention.kind is AttentionKind.FULL}
        needed = [k for k in attn if branches[k].has_ffn]
        if needed:  # one collective for every branch whose FFN reads its attention output
            reduced = self._all_reduce(torch.stack([attn[k] for k in needed]))
            attn.update({k: reduced[j] for j, k in enumerate(needed)})
        partial: torch.Tensor | int = 0  # summed, then reduced once
        done: torch.Tensor | int = 0  # already reduced
        for k, b in enumerate(branches):
            g = h
            if k in attn:
                if k in needed:
                    done, g = done + attn[k], h + attn[k]
                else:
                    partial = partial + attn[k]
            if b.has_ffn:
                x = rms_norm(g, self.w(Role.FFN_NORM, i, k), self.spec.norm_eps)
                up = self.linear(x, Role.UP, i, k)
                act = F.silu(self.linear(x, Role.GATE, i, k)) * up if b.ffn.gated else F.silu(up)
                partial = partial + self.linear(act, Role.DOWN, i, k)
        out = h + done
        return out if isinstance(partial, int) else out + self._all_reduce(partial)

    def layers(self, h: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """All of this stage's layers."""
        for i in self.local_layers:
            h = self.block(i, h, positions, cache, slots)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head: fp32 logits over the real vocab (TP padding removed)."""
        x = rms_norm(h, self.w(Role.FINAL_NORM), self.spec.norm_eps)
        logits = self._all_gather(self.linear(x, Role.LM_HEAD))
        return logits[..., :self.spec.vocab].float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Whole model on one stage: [B, T] ids (at `positions`, written to `slots` of `cache`) -> [B, T, V]."""
        return self.head(self.layers(self.embed(input_ids), positions, cache, slots))

    # ---- sublayers ---------------------------------------------------------------------------
    def _attention(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                   slots: torch.Tensor | None, branch: int | None = None, reduce: bool = True) -> torch.Tensor:
        """Layer i's attention, or its parallel_blocks branch `branch`'s (own weights, own cache
        under (i, branch)); `reduce=False` leaves the row-parallel partial sum to the caller."""
        b, t, _ = h.shape
        key = i if branch is None else (i, branch)
        hd, kvl = self.spec.head_dim, self.kv_local[key]
        x = rms_norm(h, self.w(Role.ATTN_NORM, i, branch), self.spec.norm_eps)
        q = self.linear(x, Role.Q, i, branch).view(b, t, self.local_heads, hd)
        k = self.linear(x, Role.K, i, branch).view(b, t, kvl, hd)
        v = self.linear(x, Role.V, i, branch).view(b, t, kvl, hd)
        cos, sin = rope.cos_sin(self.inv_freq, positions, q.dtype)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        k, v = self._kv_round(key, k, v)
        if cache is None:
            keys, values, key_pos = k.transpose(1, 2), v.transpose(1, 2), positions
        else:
            assert slots is not None, "a cache needs the slots to write"
            keys, values = cache.write(key, slots, positions, k, v)  # type: ignore[arg-type]
            key_pos = torch.arange(keys.shape[2], device=h.device).expand(b, -1)
        mask = key_pos[:, None, None, :] <= positions[:, None, :, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=self.local_heads != kvl)
        out = self.linear(out.transpose(1, 2).reshape(b, t, self.local_heads * hd), Role.O, i, branch)
        return self._all_reduce(out) if reduce else out

    def _linear_attention(self, i: int, h: torch.Tensor, *_: object) -> torch.Tensor:
        x = rms_norm(h, self.w(Role.ATTN_NORM, i), self.spec.norm_eps)
        return self._all_gather(self.linear(x, Role.LINEAR_ATTN, i))

    def _swiglu(self, i: int, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.w(Role.FFN_NORM, i), self.spec.norm_eps)
        if not self.spec.layers[i].ffn.gated:  # Puzzletron's `gated: false`: down(silu(up(x)))
            return self._all_reduce(self.linear(F.silu(self.linear(x, Role.UP, i)), Role.DOWN, i))
        act = F.silu(self.linear(x, Role.GATE, i)) * self.linear(x, Role.UP, i)
        return self._all_reduce(self.linear(act, Role.DOWN, i))

    def _linear_ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.w(Role.FFN_NORM, i), self.spec.norm_eps)
        return self._all_gather(self.linear(x, Role.LINEAR_FFN, i))


def _nothing(*_: object) -> int:
    """A no-op sublayer contributes 0 to the residual, as TRT-LLM's NoOp layers return 0."""
    return 0


ATTENTION: dict[AttentionKind, Callable[..., torch.Tensor | int]] = {
    AttentionKind.FULL: Decoder._attention,
    AttentionKind.LINEAR: Decoder._linear_attention,
    AttentionKind.NOOP: _nothing,
}
FFN_IMPL: dict[FFNKind, Callable[..., torch.Tensor | int]] = {
    FFNKind.SWIGLU: Decoder._swiglu,
    FFNKind.LINEAR: Decoder._linear_ffn,
    FFNKind.NOOP: _nothing,
}


def kv_scale(weights: RankWeights, key: int | tuple[int, int]) -> float:
    """The one FP8 KV scale of an attention layer: max(k_scale, v_scale), as TRT-LLM's checkpoint
    holds one `kv_cache_scaling_factor` per layer for K and V (docs/fp8.md)."""
    layer, branch = (key, None) if isinstance(key, int) else key
    return max(weights.scale(ScaleRef(ScaleKind.K, Role.K, layer, branch)),
               weights.scale(ScaleRef(ScaleKind.V, Role.V, layer, branch)))


def load_decoder(weights: RankWeights, *, dtype: torch.dtype = torch.float32,
                 group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> Decoder:
    """Build on the meta device, then fill each parameter with the rank-local tensor from `weights`."""
    spec, mapping, rank = weights.spec, weights.mapping, weights.rank
    with torch.device("meta"):
        dec = Decoder(spec, mapping, rank, dtype, group)
    load_pieces(dec, weights, rank_pieces(spec, mapping, rank), device)
    dec.inv_freq = rope.inv_freq(spec).to(device)
    return dec.eval()


def load_pieces(dec: Decoder, weights: RankWeights, pieces: list[Piece], device: torch.device | str = "cpu") -> None:
    """Fill these parameters of `dec` (all of a rank's, or one layer's for a layer-at-a-time run:
    `runtime.layerwise`), checking every piece's shape; all problems are reported at once."""
    spec, mapping, rank = weights.spec, weights.mapping, weights.rank
    problems: list[str] = []
    for piece in pieces:
        ref = piece.ref
        where = f"{ref.role.value} of " + (f"layer {ref.layer}" if ref.layer is not None else "the model")
        if ref.alias is not None and mapping.tp == 1 and dec.is_first and dec.w(ref.alias).device.type != "meta":
            dec._store(ref.role, None, dec.w(ref.alias))  # tied and whole: share, not a second copy
            continue
        try:
            t = (weights.get(ref.role, ref.layer) if ref.branch is None
                 else weights.get(ref.role, ref.layer, branch=ref.branch))  # type: ignore[call-arg]
        except KeyError as e:
            problems.append(f"{where}: rank {rank} weights hold none ({e})")
            continue
        if tuple(t.shape) != piece.shape:
            problems.append(f"{where}: rank {rank} got shape {list(t.shape)}, expected {list(piece.shape)}")
            continue
        if is_fp8(spec, ref):  # E4M3 values kept exactly (as fp32) beside their two scales
            key = (ref.role, ref.layer) if ref.branch is None else (ref.role, ref.layer, ref.branch)
            dec._fp8[key] = (weights.scale(ScaleRef(ScaleKind.WEIGHT, ref.role, ref.layer, ref.branch)),
                             weights.scale(ScaleRef(ScaleKind.INPUT, ref.role, ref.layer, ref.branch)))
            dec._store(ref.role, ref.layer, t.to(device=device, dtype=torch.float32), ref.branch)
            continue
        dec._store(ref.role, ref.layer, t.to(device=device, dtype=dec.dtype), ref.branch)
    if spec.quant.fp8_kv:
        layers = {p.ref.layer for p in pieces}
        dec._kv_scale.update({key: kv_scale(weights, key) for key in dec.kv_local
                              if (key if isinstance(key, int) else key[0]) in layers})
    if problems:
        raise CheckpointError(problems, f"rank {rank} of tp={mapping.tp} pp={mapping.pp}")

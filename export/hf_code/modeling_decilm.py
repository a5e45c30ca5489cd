"""DeciLM (`nemotron-nas`) heterogeneous decoder for transformers' `trust_remote_code` loading.

Written for the ffn-fusion export toolkit; it travels inside checkpoints, so it imports only torch
and transformers. Per layer (`config.block_configs[i]`):

- attention: full GQA attention with `num_attention_heads // n_heads_in_group` kv heads and neox
  RoPE (plain or llama3-scaled), a single hidden->hidden Linear (`self_attn.linear_attn`,
  `replace_with_linear`), or nothing (`no_op`: no `input_layernorm` either);
- FFN: SwiGLU of width `_find_multiple(int(2 * ffn_mult * hidden / 3), 256)` or `intermediate_size`,
  a single Linear (`mlp.linear_mlp`), or nothing (`no_op`: no `post_attention_layernorm`).

Each present sublayer is pre-norm RMSNorm plus a residual add. Only full-attention layers keep a KV
cache; they are numbered among themselves (cache slot 0 is the first attention layer), so a cache
holds exactly one entry per attention layer and `cache.get_seq_length()` (slot 0) is always the
length of a real attention cache, whichever layers lack attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig

_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5.x names the returned cache `cache` in later releases, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """The DeciLM width rule: 2/3 * ffn_mult * hidden, rounded up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def _ffn_width(ffn: dict, hidden: int) -> int:
    if ffn.get("ffn_mult") is not None:
        return ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden)
    if ffn.get("intermediate_size") is not None:
        return int(ffn["intermediate_size"])
    raise ValueError(f"an FFN block needs ffn_mult or intermediate_size: {dict(ffn)}")


# ---- RoPE ------------------------------------------------------------------------------------
def _rope_settings(config: Any) -> tuple[float, dict]:
    """(theta, parameters) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    return float(theta), params


def rope_inv_freq(config: Any) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies; llama3 scaling divides the long wavelengths by
    `factor`, keeps the short ones and interpolates the band between."""
    theta, params = _rope_settings(config)
    dim = config.head_dim
    freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return freq
    if kind != "llama3":
        raise ValueError(f"rope_type {kind!r} is not supported (only 'default' and 'llama3')")
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old = float(params.get("original_max_position_embeddings", config.max_position_embeddings))
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > old / low, freq / factor, freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


class DeciLMRotaryEmbedding(nn.Module):
    """cos / sin tables for integer positions. The inverse frequencies are computed on first use
    (not a buffer), so building the model on the meta device, as from_pretrained does, cannot lose them."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.config = config
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq.get(x.device)
        if inv is None:
            inv = self._inv_freq[x.device] = rope_inv_freq(self.config).to(x.device)
        angles = position_ids.to(torch.float32)[..., None] * inv  # [B, T, D/2]
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, D]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox RoPE on [B, H, T, D]: dimension j pairs with j + D/2."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


# ---- sublayers ---------------------------------------------------------------------------------
class DeciLMRMSNorm(nn.Module):
    """As Llama: normalise in fp32, cast back, then scale."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DeciLMAttention(nn.Module):
    """Causal GQA attention with its own kv-head count; `cache_index` is its slot in the KV cache."""

    def __init__(self, config: DeciLMConfig, kv_heads: int, cache_index: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, kv_heads, config.head_dim
        self.cache_index = cache_index
        h, bias = config.hidden_size, bool(config.attention_bias)
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: Any | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        if self.kv_heads != self.heads:  # query head i reads kv head i // group
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class DeciLMLinearAttention(nn.Module):
    """`replace_with_linear` attention: one hidden->hidden Linear, no cache, no positions."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *_: Any) -> torch.Tensor:
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: DeciLMConfig, width: int, act: str) -> None:
        super().__init__()
        h, bias = config.hidden_size, bool(config.mlp_bias)
        self.gate_proj = nn.Linear(h, width, bias=bias)
        self.up_proj = nn.Linear(h, width, bias=bias)
        self.down_proj = nn.Linear(width, h, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """`replace_with_linear` FFN: one hidden->hidden Linear."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """One block; a no-op sublayer has no modules at all (so no norm weight is expected for it)."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_index: int | None) -> None:
        super().__init__()
        block = config.block_configs[layer_idx]
        attn, ffn = block["attention"], block["ffn"]
        self.has_attention, self.has_ffn = not attn.get("no_op"), not ffn.get("no_op")
        if self.has_attention:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            if attn.get("replace_with_linear"):
                self.self_attn: nn.Module = DeciLMLinearAttention(config)
            else:
                assert cache_index is not None
                kv = config.num_attention_heads // attn["n_heads_in_group"]
                self.self_attn = DeciLMAttention(config, kv, cache_index)
        if self.has_ffn:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            if ffn.get("replace_with_linear"):
                self.mlp: nn.Module = DeciLMLinearMLP(config)
            else:
                act = ffn.get("hidden_act") or config.hidden_act
                self.mlp = DeciLMMLP(config, _ffn_width(ffn, config.hidden_size), act)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: Any | None) -> torch.Tensor:
        if self.has_attention:
            h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        if self.has_ffn:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


def uses_kv_cache(block: dict) -> bool:
    """Full attention keeps K/V; no-op and linear attention keep nothing."""
    attn = block["attention"]
    return not attn.get("no_op") and not attn.get("replace_with_linear")


# ---- models ------------------------------------------------------------------------------------
class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.x: a Cache object, not legacy tuples
    _supports_static_cache = False


def _causal_mask(attention_mask: torch.Tensor | None, b: int, t: int, past: int,
                 device: torch.device) -> torch.Tensor:
    """[B, 1, T, past + T] boolean, True where a query may attend: causal over absolute cache
    positions, and not on padding (`attention_mask` [B, past + T], 1 = real token)."""
    kv = past + t
    q_pos = torch.arange(past, kv, device=device)
    mask = (torch.arange(kv, device=device)[None, :] <= q_pos[:, None])[None, None].expand(b, 1, t, kv)
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            given = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
            mask = mask & given[..., -t:, -kv:]
        else:
            mask = mask & attention_mask[:, None, None, -kv:].to(device=device, dtype=torch.bool)
    # a row with nothing to attend to (a left-padding query) would give NaN; let it see everything
    return mask | ~mask.any(dim=-1, keepdim=True)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers, slot = [], 0
        for i, block in enumerate(config.block_configs):
            full = uses_kv_cache(block)
            layers.append(DeciLMDecoderLayer(config, i, slot if full else None))
            slot += int(full)
        self.layers = nn.ModuleList(layers)
        self.num_cache_layers = slot
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                past_key_values: Any | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        """`cache` is transformers 5's name for the KV cache, `past_key_values` the older one (which
        also passes `cache_position`, read from kwargs so newer releases see no use of it)."""
        cache_position = kwargs.get("cache_position")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache()
        b, t = h.shape[:2]
        past = cache.get_seq_length() if cache is not None and self.num_cache_layers else 0
        if position_ids is None:
            start = int(cache_position[0]) if cache_position is not None else past
            position_ids = torch.arange(start, start + t, device=h.device)[None].expand(b, t)
        mask = _causal_mask(attention_mask, b, t, past, h.device)
        rope = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, rope, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{_CACHE_FIELD: cache})


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # transformers 5 maps the tied parameter to its source; 4.x lists the tied names
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, past_key_values: Any | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits for the last `logits_to_keep` positions (0: all); `labels` gives the shifted LM loss."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         past_key_values=past_key_values, cache_position=kwargs.get("cache_position"))
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

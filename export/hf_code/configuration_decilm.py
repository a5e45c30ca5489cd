"""DeciLM (`nemotron-nas`) configuration for transformers' `trust_remote_code` loading.

Written for the ffn-fusion export toolkit; it travels inside checkpoints, so it imports only
transformers. The schema is the one of the released Nemotron (Puzzle / FFN-Fusion) checkpoints: one
`block_configs` entry per layer with

    attention: {n_heads_in_group, no_op, replace_with_linear, ...}
    ffn:       {ffn_mult | intermediate_size, no_op, replace_with_linear, ...}

Each entry and its two parts are dicts that also read as attributes, because the consumers disagree:
TensorRT-LLM's PyTorch model reads `block.attention.no_op` and `block.ffn.ffn_mult`, vLLM reads
attributes and tests `hasattr(block.ffn, "ffn_mult")` before falling back to `intermediate_size`, and
plain JSON tooling reads `block["attention"]["no_op"]`. They serialise as plain JSON objects.
"""

from __future__ import annotations

import copy
from typing import Any

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 4.56 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig

DEFAULT_ROPE_THETA = 10000.0


class AttrDict(dict):
    """A dict whose keys are also attributes: `d["no_op"]` and `d.no_op` are the same value.

    A missing key raises AttributeError (not KeyError) from attribute access, so `hasattr` and
    `getattr(d, k, default)` behave as they do on an object, and copy / pickle / deepcopy see a dict.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __deepcopy__(self, memo: dict) -> AttrDict:
        return type(self)({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def __reduce__(self) -> tuple:
        return (type(self), (dict(self),))


def _as_dict(obj: Any) -> dict:
    """A block part given as a dict, or as an object (another loader's dataclass), as a plain dict."""
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise TypeError(f"a block config part must be an object, got {type(obj).__name__}")


def block_config(raw: Any) -> AttrDict:
    """One `block_configs` entry with attribute access on the entry and on both of its parts.

    Normalised only where a consumer would misread it: an FFN described by `intermediate_size` whose
    `ffn_mult` is null loses the null `ffn_mult` key, since vLLM takes any present `ffn_mult`
    attribute (even None) as the width to use.
    """
    entry = _as_dict(raw)
    attention = AttrDict(_as_dict(entry.get("attention", {})))
    ffn = AttrDict(_as_dict(entry.get("ffn", {})))
    attention.setdefault("no_op", False)
    attention.setdefault("replace_with_linear", False)
    attention.setdefault("n_heads_in_group", None)
    ffn.setdefault("no_op", False)
    ffn.setdefault("replace_with_linear", False)
    if ffn.get("ffn_mult") is None and ffn.get("intermediate_size") is not None:
        ffn.pop("ffn_mult", None)
    elif "intermediate_size" not in ffn:
        ffn.setdefault("ffn_mult", None)
    out = AttrDict({k: v for k, v in entry.items() if k not in ("attention", "ffn")})
    out["attention"], out["ffn"] = attention, ffn
    return out


def rope_parameters_from(rope_theta: float | None, rope_scaling: dict | None,
                         rope_parameters: dict | None) -> dict:
    """One transformers-5 style `rope_parameters` dict from either schema.

    transformers >= 5 writes `rope_parameters` (theta inside); older configs have `rope_theta` plus
    `rope_scaling`. Reading only one of them would silently fall back to base 10000 and no scaling.
    """
    if rope_parameters:
        params = dict(rope_parameters)
    else:
        params = dict(rope_scaling or {})
    if params.get("rope_theta") is None:
        params["rope_theta"] = float(rope_theta) if rope_theta is not None else DEFAULT_ROPE_THETA
    params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
    return params


class DeciLMConfig(PreTrainedConfig):
    """A heterogeneous Llama-style decoder: per-layer attention (GQA group, linear, none) and FFN width.

    `num_hidden_layers` is the number of `block_configs` entries when they are given. Without
    `block_configs` every layer is a full Llama block (`num_key_value_heads`, `intermediate_size`).
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 4096, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, head_dim: int | None = None,
                 block_configs: list[Any] | None = None, hidden_act: str = "silu",
                 rms_norm_eps: float = 1e-5, max_position_embeddings: int = 4096,
                 rope_theta: float | None = None, rope_scaling: dict | None = None,
                 rope_parameters: dict | None = None, attention_bias: bool = False, mlp_bias: bool = False,
                 tie_word_embeddings: bool = False, initializer_range: float = 0.02, use_cache: bool = True,
                 intermediate_size: int | None = None, num_key_value_heads: int | None = None,
                 pad_token_id: int | None = None, bos_token_id: int | None = 1, eos_token_id: Any = 2,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.intermediate_size = intermediate_size
        self.num_key_value_heads = num_key_value_heads
        if block_configs is None:
            group = num_attention_heads // (num_key_value_heads or num_attention_heads)
            block_configs = [{"attention": {"n_heads_in_group": group},
                              "ffn": {"intermediate_size": intermediate_size or 4 * hidden_size}}
                             ] * num_hidden_layers
        self.block_configs = [block_config(b) for b in block_configs]
        self.num_hidden_layers = len(self.block_configs)
        params = rope_parameters_from(rope_theta, rope_scaling, rope_parameters)
        self.rope_parameters = params
        if not isinstance(getattr(type(self), "rope_scaling", None), property):
            # transformers < 5 reads (and saves) `rope_theta` + `rope_scaling` as data; 5 has only
            # `rope_parameters` (`rope_scaling` is a view of it), so a saved config keeps one schema
            self.rope_theta = params["rope_theta"]
            self.rope_scaling = None if params["rope_type"] == "default" else {
                k: v for k, v in params.items() if k != "rope_theta"}
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        # the base class may standardise or replace these; the blocks must stay attribute-readable
        self.block_configs = [block_config(b) for b in self.block_configs]
        self.tie_word_embeddings = tie_word_embeddings

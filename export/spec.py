"""The one description of a model that every stage reads.

A `ModelSpec` says, per layer, what the attention and the FFN are (full / linear / no-op, with
their own kv-head count and width) plus the global shapes. It is parsed once from an HF
config.json (DeciLM `block_configs` or plain Llama) and serialises back to an HF DeciLM config and
to TensorRT-LLM `layer_configs`. No other module reads HF config fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from export.errors import ConfigError

DECILM = "DeciLMForCausalLM"
LLAMA = "LlamaForCausalLM"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


class AttentionKind(StrEnum):
    """Values are TRT-LLM's `AttentionImplementation` strings."""

    FULL = "attention"
    LINEAR = "linear"
    NOOP = "no_op"


class FFNKind(StrEnum):
    """Values are TRT-LLM's `FFNImplementation` strings."""

    SWIGLU = "mlp"
    LINEAR = "linear"
    NOOP = "no_op"


@dataclass(frozen=True)
class Attention:
    kind: AttentionKind
    kv_heads: int | None = None  # only for FULL


@dataclass(frozen=True)
class FFN:
    kind: FFNKind
    width: int | None = None  # intermediate size, only for SWIGLU
    # As the source wrote it (kept so a round trip writes the same number); not part of identity.
    ffn_mult: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Layer:
    attention: Attention
    ffn: FFN

    @property
    def has_attention(self) -> bool:
        return self.attention.kind is not AttentionKind.NOOP

    @property
    def has_ffn(self) -> bool:
        return self.ffn.kind is not FFNKind.NOOP

    @property
    def is_empty(self) -> bool:
        return not self.has_attention and not self.has_ffn

    def short(self) -> str:
        """A compact label such as 'A8/F1024', '-/F4096', 'L/-' or 'empty'."""
        if self.is_empty:
            return "empty"
        a = {AttentionKind.FULL: f"A{self.attention.kv_heads}", AttentionKind.LINEAR: "L",
             AttentionKind.NOOP: "-"}[self.attention.kind]
        f = {FFNKind.SWIGLU: f"F{self.ffn.width}", FFNKind.LINEAR: "L", FFNKind.NOOP: "-"}[self.ffn.kind]
        return f"{a}/{f}"


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def to_hf(self) -> dict[str, Any]:
        return {"factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "rope_type": "llama3"}


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    layers: tuple[Layer, ...]
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "bfloat16"
    max_position_embeddings: int = 4096
    architecture: str = DECILM
    # Source config keys no stage interprets (token ids, auto_map, ...), kept for round trips.
    passthrough: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ---- derived facts ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention_layers(self) -> list[int]:
        return [i for i, lay in enumerate(self.layers) if lay.attention.kind is AttentionKind.FULL]

    def ffn_layers(self) -> list[int]:
        return [i for i, lay in enumerate(self.layers) if lay.has_ffn]

    def empty_layers(self) -> list[int]:
        return [i for i, lay in enumerate(self.layers) if lay.is_empty]

    def kv_cache_bytes_per_token(self, dtype: str | None = None) -> int:
        """K and V for every full-attention layer; no-op and linear layers keep no cache."""
        per = DTYPE_BYTES[normalize_dtype(dtype or self.dtype)]
        return sum(2 * lay.attention.kv_heads * self.head_dim * per  # type: ignore[operator]
                   for lay in self.layers if lay.attention.kind is AttentionKind.FULL)

    def sync_points_per_token(self) -> int:
        """One all-reduce (or all-gather) after each attention and each FFN sublayer under TP."""
        return sum(int(lay.has_attention) + int(lay.has_ffn) for lay in self.layers)

    def with_dtype(self, dtype: str) -> ModelSpec:
        return replace(self, dtype=normalize_dtype(dtype))

    def with_layers(self, layers: list[Layer] | tuple[Layer, ...]) -> ModelSpec:
        return replace(self, layers=tuple(layers), architecture=DECILM)

    # ---- serialisation ---------------------------------------------------------------
    def to_hf_config(self) -> dict[str, Any]:
        """An HF DeciLM (`nemotron-nas`) config.json that vLLM, TRT-LLM and transformers load."""
        cfg: dict[str, Any] = dict(self.passthrough)
        cfg.update({
            "architectures": [DECILM], "model_type": "nemotron-nas",
            "hidden_size": self.hidden, "num_attention_heads": self.heads, "head_dim": self.head_dim,
            "num_hidden_layers": self.num_layers, "vocab_size": self.vocab,
            "intermediate_size": None, "num_key_value_heads": None,
            "hidden_act": "silu", "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_embeddings, "torch_dtype": self.dtype,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False, "mlp_bias": False,
            "block_configs": [_block_config(lay, self) for lay in self.layers],
        })
        return cfg

    def to_trtllm_layer_configs(self) -> list[dict[str, Any]]:
        """`layer_configs` entries with only the keys TRT-LLM's dataclasses accept."""
        return [{"attention": {"impl": lay.attention.kind.value,
                               "num_key_value_heads": lay.attention.kv_heads},
                 "ffn": {"impl": lay.ffn.kind.value, "intermediate_size": lay.ffn.width}}
                for lay in self.layers]

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        return parse_hf_config(cfg)

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        """From a config.json file or a directory holding one."""
        return parse_hf_config(read_config_json(path))


# ---- the width rule ----------------------------------------------------------------------
def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_width(ffn_mult: float, hidden: int) -> int:
    """Exactly `_find_multiple(int(2 * ffn_mult * n_embd / 3), 256)` as HF, vLLM and TRT-LLM write it."""
    return find_multiple(int(2 * ffn_mult * hidden / 3), 256)


def width_to_ffn_mult(width: int, hidden: int) -> float:
    """The shortest decimal ffn_mult whose width rule gives exactly `width`.

    Raises when no ffn_mult can (a width that is not a multiple of 256).
    """
    if width % 256:
        raise ConfigError(f"FFN width {width} is not a multiple of 256; no ffn_mult expresses it")
    exact = 3 * width / (2 * hidden)
    for digits in range(0, 13):
        for cand in (round(exact, digits), round(exact + 10 ** -digits, digits)):
            if ffn_mult_to_width(cand, hidden) == width:
                return cand
    raise ConfigError(f"no ffn_mult gives width {width} at hidden {hidden}")


def normalize_dtype(dtype: str) -> str:
    d = DTYPE_ALIASES.get(dtype, dtype)
    if d not in DTYPE_BYTES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of bf16, fp16, fp32")
    return d


# ---- parsing -----------------------------------------------------------------------------
def read_config_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p}: no config.json found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from e


_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "auto_map", "transformers_version",
                "_name_or_path", "initializer_range", "use_cache", "pretraining_tp",
                "attention_dropout")


def _require(cfg: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str = "config") -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: required field {key!r} is missing")
    val = cfg[key]
    if not isinstance(val, typ) or (isinstance(val, bool) and typ is int):
        raise ConfigError(f"{where}: field {key!r} must be {getattr(typ, '__name__', typ)}, got {val!r}")
    return val


def parse_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    arch = (cfg.get("architectures") or [None])[0]
    mtype = cfg.get("model_type")
    is_deci = arch == DECILM or mtype in ("nemotron-nas", "deci")
    if not is_deci and arch != LLAMA and mtype != "llama":
        raise ConfigError(f"config: architecture {arch!r} (model_type {mtype!r}) is not supported; "
                          f"expected {DECILM} or {LLAMA}")
    hidden = _require(cfg, "hidden_size", int)
    heads = _require(cfg, "num_attention_heads", int)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
    head_dim = cfg.get("head_dim") or hidden // heads
    if is_deci and "block_configs" in cfg:
        layers = _parse_block_configs(cfg, hidden, heads)
    else:
        layers = _uniform_layers(cfg, heads)
    n = cfg.get("num_hidden_layers")
    if n is not None and n != len(layers):
        raise ConfigError(f"config: num_hidden_layers is {n} but {len(layers)} layers are described")
    return ModelSpec(
        hidden=hidden, heads=heads, head_dim=head_dim, vocab=_require(cfg, "vocab_size", int),
        layers=tuple(layers), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=_parse_rope_scaling(cfg.get("rope_scaling")),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=normalize_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        architecture=DECILM if is_deci else LLAMA,
        passthrough={k: cfg[k] for k in _PASSTHROUGH if k in cfg},
    )


def _uniform_layers(cfg: dict[str, Any], heads: int) -> list[Layer]:
    n = _require(cfg, "num_hidden_layers", int)
    kv = cfg.get("num_key_value_heads") or heads
    width = _require(cfg, "intermediate_size", int)
    _check_kv(kv, heads, "config")
    layer = Layer(Attention(AttentionKind.FULL, kv), FFN(FFNKind.SWIGLU, width))
    return [layer] * n


def _check_kv(kv: int, heads: int, where: str) -> None:
    if kv <= 0 or heads % kv:
        raise ConfigError(f"{where}: {kv} kv heads do not divide {heads} attention heads")


def _parse_block_configs(cfg: dict[str, Any], hidden: int, heads: int) -> list[Layer]:
    blocks = cfg["block_configs"]
    if not isinstance(blocks, list):
        raise ConfigError("config: field 'block_configs' must be a list")
    return [_parse_block(b, i, hidden, heads) for i, b in enumerate(blocks)]


def _refuse(where: str, field_name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: field {field_name!r} = {value!r}: {why}")


def _parse_block(block: Any, i: int, hidden: int, heads: int) -> Layer:
    where = f"layer {i}"
    if not isinstance(block, dict) or "attention" not in block or "ffn" not in block:
        raise ConfigError(f"{where}: block config must have 'attention' and 'ffn'")
    return Layer(_parse_attention(block["attention"], f"{where} attention", heads),
                 _parse_ffn(block["ffn"], f"{where} ffn", hidden))


def _parse_attention(a: dict[str, Any], where: str, heads: int) -> Attention:
    if a.get("sparsify"):
        raise _refuse(where, "sparsify", a["sparsify"], "sparse attention is not supported")
    for key in ("window_length", "num_sink_tokens"):
        if a.get(key) is not None:
            raise _refuse(where, key, a[key], "sliding-window / sink attention is not supported")
    for key in ("use_prefill_window_in_sink_attention", "unshifted_sink"):
        if a.get(key):
            raise _refuse(where, key, a[key], "sink attention is not supported")
    if a.get("no_op"):
        return Attention(AttentionKind.NOOP)
    if a.get("replace_with_linear"):
        return Attention(AttentionKind.LINEAR)
    group = a.get("n_heads_in_group")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise _refuse(where, "n_heads_in_group", group, "must be a positive integer")
    if heads % group:
        raise _refuse(where, "n_heads_in_group", group, f"does not divide {heads} heads")
    return Attention(AttentionKind.FULL, heads // group)


def _parse_ffn(f: dict[str, Any], where: str, hidden: int) -> FFN:
    if f.get("sparsify"):
        raise _refuse(where, "sparsify", f["sparsify"], "sparse FFNs are not supported")
    act = f.get("hidden_act")
    if act is not None and act != "silu":
        raise _refuse(where, "hidden_act", act, "only 'silu' (SwiGLU) is supported")
    if f.get("no_op"):
        return FFN(FFNKind.NOOP)
    if f.get("replace_with_linear"):
        return FFN(FFNKind.LINEAR)
    mult = f.get("ffn_mult")
    if mult is None and isinstance(f.get("intermediate_size"), int):
        return FFN(FFNKind.SWIGLU, f["intermediate_size"])
    if not isinstance(mult, (int, float)) or isinstance(mult, bool) or not math.isfinite(mult) or mult <= 0:
        raise _refuse(where, "ffn_mult", mult, "must be a positive number")
    return FFN(FFNKind.SWIGLU, ffn_mult_to_width(mult, hidden), float(mult))


def _parse_rope_scaling(rs: Any) -> RopeScaling | None:
    if rs is None:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"config: field 'rope_scaling.rope_type' = {kind!r}: only 'llama3' is supported")
    try:
        return RopeScaling(float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)),
                           float(rs.get("high_freq_factor", 4.0)),
                           int(rs["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"config: field 'rope_scaling.{e.args[0]}' is missing") from None


def _block_config(lay: Layer, spec: ModelSpec) -> dict[str, Any]:
    a, f = lay.attention, lay.ffn
    attention = {"n_heads_in_group": spec.heads // a.kv_heads if a.kind is AttentionKind.FULL else None,
                 "no_op": a.kind is AttentionKind.NOOP,
                 "replace_with_linear": a.kind is AttentionKind.LINEAR,
                 "sparsify": None, "num_sink_tokens": None, "window_length": None,
                 "unshifted_sink": False, "use_prefill_window_in_sink_attention": False}
    mult = None
    if f.kind is FFNKind.SWIGLU:
        assert f.width is not None
        mult = f.ffn_mult if f.ffn_mult is not None else width_to_ffn_mult(f.width, spec.hidden)
        if ffn_mult_to_width(mult, spec.hidden) != f.width:
            raise ConfigError(f"ffn_mult {mult} does not give width {f.width}")
    ffn = {"ffn_mult": mult, "no_op": f.kind is FFNKind.NOOP,
           "replace_with_linear": f.kind is FFNKind.LINEAR, "sparsify": None}
    return {"attention": attention, "ffn": ffn}

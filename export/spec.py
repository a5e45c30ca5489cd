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
from export.fields import MISSING, Fields, is_int, is_number

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


class RopeSchema(StrEnum):
    """Where a config keeps its RoPE settings, so an HF config we write keeps the source's keys."""

    LEGACY = "rope_theta+rope_scaling"  # transformers < 5
    PARAMETERS = "rope_parameters"  # transformers >= 5
    BOTH = "both"


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
    rope_schema: RopeSchema = field(default=RopeSchema.LEGACY, compare=False)
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
        """The collectives one token's forward pass waits on under tensor parallelism (tp > 1).

        The one definition every command reports (inspect, fuse, evaluate, the benchmarks, which
        count the collectives the ranks actually issue): an all-reduce after every attention and
        every FFN sublayer (linear replacements included: they are row-split too), plus the
        all-gather of the vocab-split lm_head's logits. At tp = 1 there are none.
        """
        return sum(int(lay.has_attention) + int(lay.has_ffn) for lay in self.layers) + 1

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
            "hidden_act": "silu", "rms_norm_eps": self.norm_eps, **self.hf_rope(),
            "tie_word_embeddings": self.tie_embeddings, "torch_dtype": self.dtype,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False, "mlp_bias": False,
            "block_configs": [_block_config(lay, self) for lay in self.layers],
        })
        return cfg

    def hf_rope(self) -> dict[str, Any]:
        """The RoPE keys of an HF config, in the schema the source used."""
        out: dict[str, Any] = {}
        if self.rope_schema is not RopeSchema.PARAMETERS:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = self.rope_scaling.to_hf() if self.rope_scaling else None
        if self.rope_schema is not RopeSchema.LEGACY:
            scaling = self.rope_scaling.to_hf() if self.rope_scaling else {"rope_type": "default"}
            out["rope_parameters"] = {**scaling, "rope_theta": self.rope_theta}
        return out

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
        """From a config.json file or a directory holding one; errors name the file."""
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        return parse_hf_config(read_config_json(p), where=str(p))


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
    mult = ffn_mult_for(width, hidden)
    if mult is None:
        raise ConfigError(f"no ffn_mult gives width {width} at hidden {hidden}")
    return mult


def ffn_mult_for(width: int, hidden: int) -> float | None:
    """`width_to_ffn_mult`, or None where no ffn_mult expresses the width: a DeciLM block then says
    `intermediate_size` instead (as Puzzletron's configs and vLLM's loader do)."""
    if width % 256:
        return None
    exact = 3 * width / (2 * hidden)
    for digits in range(0, 13):
        for cand in (round(exact, digits), round(exact + 10 ** -digits, digits)):
            if ffn_mult_to_width(cand, hidden) == width:
                return cand
    return None


def is_known_dtype(dtype: object) -> bool:
    return isinstance(dtype, str) and DTYPE_ALIASES.get(dtype, dtype) in DTYPE_BYTES


def casts_exactly(source: str, target: str) -> bool:
    """Every value of `source` is representable in `target` (bf16 and fp16 widen to fp32 exactly;
    bf16 <-> fp16 do not: fp16 lacks bf16's range, bf16 lacks fp16's precision)."""
    s, t = normalize_dtype(source), normalize_dtype(target)
    return s == t or t == "float32"


def normalize_dtype(dtype: str) -> str:
    """The canonical name of a dtype alias (bf16 -> bfloat16)."""
    d = DTYPE_ALIASES.get(dtype, dtype)
    if d not in DTYPE_BYTES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of bf16, fp16, fp32")
    return d


# ---- parsing -----------------------------------------------------------------------------
def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in config.json (UTF-8), or one ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p}: no config.json found")
    try:
        cfg = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "auto_map", "transformers_version",
                "_name_or_path", "initializer_range", "use_cache", "pretraining_tp",
                "attention_dropout")


def parse_hf_config(cfg: dict[str, Any], where: str = "config") -> ModelSpec:
    """Validate and parse an HF config; every problem of the top-level fields is reported at once."""
    f = Fields(cfg, where)
    f.raise_if_any()
    arch = cfg.get("architectures")
    arch = arch[0] if isinstance(arch, list) and arch else None
    mtype = cfg.get("model_type")
    is_deci = arch == DECILM or mtype in ("nemotron-nas", "deci")
    if not is_deci and arch != LLAMA and mtype != "llama":
        raise ConfigError(f"{where}: architecture {arch!r} (model_type {mtype!r}) is not supported; "
                          f"expected {DECILM} or {LLAMA}")
    hidden, heads, vocab = f.pos_int("hidden_size"), f.pos_int("num_attention_heads"), f.pos_int("vocab_size")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        f.bad("hidden_act", act, "only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            f.bad(key, cfg[key], "biases are not supported (no q/k/v/o or gate/up/down bias tensors are read)")
    head_dim = f.pos_int("head_dim", None)
    n = f.pos_int("num_hidden_layers", None if is_deci and "block_configs" in cfg else MISSING)
    rope = parse_rope(f)
    scalars = {"norm_eps": f.pos_float("rms_norm_eps", 1e-5),
               "max_position_embeddings": f.pos_int("max_position_embeddings", 4096),
               "tie_embeddings": f.flag("tie_word_embeddings", False)}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if not is_known_dtype(dtype):
        f.bad("torch_dtype", dtype, "unsupported dtype; expected bfloat16, float16 or float32")
        dtype = "float32"
    f.raise_if_any()
    layers = (_parse_block_configs(cfg, hidden, heads, where) if is_deci and "block_configs" in cfg
              else _uniform_layers(Fields(cfg, where), heads, n))
    if n is not None and n != len(layers):
        raise ConfigError(f"{where}: num_hidden_layers is {n} but {len(layers)} layers are described")
    return ModelSpec(
        hidden=hidden, heads=heads, head_dim=head_dim or hidden // heads, vocab=vocab, layers=tuple(layers),
        **rope, **scalars, dtype=normalize_dtype(dtype), architecture=DECILM if is_deci else LLAMA,
        passthrough={k: cfg[k] for k in _PASSTHROUGH if k in cfg},
    )


def _uniform_layers(f: Fields, heads: int, n: int) -> list[Layer]:
    kv = f.pos_int("num_key_value_heads", heads)
    width = f.pos_int("intermediate_size")
    f.raise_if_any()
    _check_kv(kv, heads, f.where)
    return [Layer(Attention(AttentionKind.FULL, kv), FFN(FFNKind.SWIGLU, width))] * n


def _check_kv(kv: int, heads: int, where: str) -> None:
    if heads % kv:
        raise ConfigError(f"{where}: {kv} kv heads do not divide {heads} attention heads")


def _parse_block_configs(cfg: dict[str, Any], hidden: int, heads: int, where: str) -> list[Layer]:
    blocks = cfg["block_configs"]
    if not isinstance(blocks, list):
        raise ConfigError(f"{where}: field 'block_configs' must be a list")
    return [_parse_block(b, i, hidden, heads) for i, b in enumerate(blocks)]


def _refuse(where: str, field_name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: field {field_name!r} = {value!r}: {why}")


def _parse_block(block: Any, i: int, hidden: int, heads: int) -> Layer:
    where = f"layer {i}"
    if not isinstance(block, dict) or "attention" not in block or "ffn" not in block:
        raise ConfigError(f"{where}: block config must be an object with 'attention' and 'ffn'")
    for part in ("attention", "ffn"):
        if not isinstance(block[part], dict):
            raise _refuse(where, part, block[part], "must be an object")
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
    if not is_int(group) or group <= 0:
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
    if mult is None and f.get("intermediate_size") is not None:
        width = f["intermediate_size"]
        if not is_int(width) or width <= 0:
            raise _refuse(where, "intermediate_size", width, "must be a positive integer")
        return FFN(FFNKind.SWIGLU, width)
    if not is_number(mult) or not math.isfinite(mult) or mult <= 0:
        raise _refuse(where, "ffn_mult", mult, "must be a positive number")
    return FFN(FFNKind.SWIGLU, ffn_mult_to_width(mult, hidden), float(mult))


# ---- RoPE: transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) ----------------
def parse_rope(f: Fields) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling` and `rope_schema` for ModelSpec, from either schema.

    transformers >= 5 saves only `rope_parameters` ({"rope_theta", "rope_type", "factor", ...});
    older configs have top-level `rope_theta` / `rope_scaling`. Reading only the old keys would
    silently give base 10000 and no scaling. A config carrying both must agree.
    """
    legacy = f.has("rope_theta") or f.has("rope_scaling")
    params = f.obj.get("rope_parameters")
    schema = RopeSchema.PARAMETERS if params is not None else RopeSchema.LEGACY
    if params is not None and not isinstance(params, dict):
        f.bad("rope_parameters", params, "must be an object")
        return {"rope_theta": 10000.0, "rope_scaling": None, "rope_schema": schema}
    if params is not None and params and all(isinstance(v, dict) for v in params.values()):
        f.bad("rope_parameters", params, "per-layer-type RoPE parameters are not supported")
        return {"rope_theta": 10000.0, "rope_scaling": None, "rope_schema": schema}
    new = None
    if params is not None:
        p = Fields(params, f"{f.where}: rope_parameters", f.problems)
        new = (p.pos_float("rope_theta", 10000.0), _parse_scaling(p, params, "rope_parameters"))
    old = None
    if legacy or params is None:
        rs = f.obj.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            f.bad("rope_scaling", rs, "must be an object or null")
            rs = None
        scaling = _parse_scaling(Fields(rs, f"{f.where}: rope_scaling", f.problems), rs, "rope_scaling") if rs else None
        old = (f.pos_float("rope_theta", new[0] if new else 10000.0), scaling)
    if new is not None and old is not None and legacy:
        schema = RopeSchema.BOTH
        if new != old:
            f.problems.append(f"{f.where}: 'rope_parameters' {_rope_str(new)} disagrees with 'rope_theta' / "
                              f"'rope_scaling' {_rope_str(old)}; remove one of them")
    theta, scaling = new if new is not None else old  # type: ignore[misc]
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_schema": schema}


def _parse_scaling(f: Fields, obj: dict[str, Any] | None, name: str) -> RopeScaling | None:
    if not obj:
        return None
    kind = obj.get("rope_type") or obj.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        f.problems.append(f"{f.where}: field 'rope_type' = {kind!r}: only 'default' and 'llama3' are supported")
        return None
    vals = (f.pos_float("factor"), f.pos_float("low_freq_factor", 1.0), f.pos_float("high_freq_factor", 4.0),
            f.pos_int("original_max_position_embeddings"))
    if None in vals or MISSING in vals:
        return None
    if vals[2] <= vals[1]:
        f.bad("high_freq_factor", vals[2], f"must be greater than low_freq_factor {vals[1]}")
        return None
    return RopeScaling(*vals)


def _rope_str(rope: tuple[float, RopeScaling | None]) -> str:
    theta, scaling = rope
    return f"(theta {theta}, scaling {scaling.to_hf() if scaling else None})"


def _block_config(lay: Layer, spec: ModelSpec) -> dict[str, Any]:
    a, f = lay.attention, lay.ffn
    attention = {"n_heads_in_group": spec.heads // a.kv_heads if a.kind is AttentionKind.FULL else None,
                 "no_op": a.kind is AttentionKind.NOOP,
                 "replace_with_linear": a.kind is AttentionKind.LINEAR,
                 "sparsify": None, "num_sink_tokens": None, "window_length": None,
                 "unshifted_sink": False, "use_prefill_window_in_sink_attention": False}
    ffn: dict[str, Any] = {"ffn_mult": None, "no_op": f.kind is FFNKind.NOOP,
                           "replace_with_linear": f.kind is FFNKind.LINEAR, "sparsify": None}
    if f.kind is FFNKind.SWIGLU:
        assert f.width is not None
        mult = f.ffn_mult if f.ffn_mult is not None else ffn_mult_for(f.width, spec.hidden)
        if mult is None:  # vLLM and our parser read it; TRT-LLM's PyTorch backend needs ffn_mult
            ffn["intermediate_size"] = f.width
        elif ffn_mult_to_width(mult, spec.hidden) != f.width:
            raise ConfigError(f"ffn_mult {mult} does not give width {f.width}")
        ffn["ffn_mult"] = mult
    return {"attention": attention, "ffn": ffn}

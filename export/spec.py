"""The one description of a model that every stage reads.

A `ModelSpec` says, per layer, what the attention and the FFN are (full / linear / no-op, with
their own kv-head count and width; SwiGLU or a plain MLP; or a Puzzletron `parallel_blocks` layer
of such branches) plus the global shapes. It is parsed once from an HF config.json (DeciLM
`block_configs` in the released Nemotron or the Model-Optimizer Puzzletron schema, or plain Llama)
and serialises back to an HF DeciLM config in the source's schema (`BlockSchema`); target formats
(TensorRT-LLM's `layer_configs`, rotary fields) are rendered in `export.trtllm`. No other module reads
HF config fields, and `parse_rope_scaling` is the one reader of a RoPE scaling object. A field no stage can honour
is refused here, naming the layer and the field, never dropped.
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
from export.quantization import HF_QUANT_CONFIG, Quantization, parse_quantization

DECILM = "DeciLMForCausalLM"
# TRT-LLM's nemotron_nas has no parallel blocks and builds every MLP as a GatedMLP.
TRTLLM_STAGE = "TensorRT-LLM's nemotron_nas (GatedMLP FFNs only, no parallel blocks)"
CPU_STAGE = "the CPU reference runtime"
# What the CPU runtime runs: plain MLPs, and parallel blocks of attention / MLP branches.
CPU_RUNS = {"plain_mlp": False, "ffn_only_parallel_ok": True, "attention_branches_ok": True}
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
    # False: Puzzletron's `gated: false`, a plain MLP down(silu(up(x))) with no gate_proj
    # (`DeciLMVanillaMLP` in its modeling_decilm.py); True: SwiGLU. Only meaningful for SWIGLU kind.
    gated: bool = True


@dataclass(frozen=True)
class Layer:
    """One decoder layer. A Puzzletron `parallel_blocks` layer has `branches` (each an ordinary
    layer with its own norms and weights, all reading the same input; the layer's output is
    sum_k branch_k(x) - (n-1) x) and no-op `attention` / `ffn` of its own."""

    attention: Attention
    ffn: FFN
    branches: tuple[Layer, ...] = ()

    @property
    def is_parallel(self) -> bool:
        return bool(self.branches)

    @property
    def has_attention(self) -> bool:
        if self.branches:
            return any(b.has_attention for b in self.branches)
        return self.attention.kind is not AttentionKind.NOOP

    @property
    def has_ffn(self) -> bool:
        if self.branches:
            return any(b.has_ffn for b in self.branches)
        return self.ffn.kind is not FFNKind.NOOP

    @property
    def is_empty(self) -> bool:
        return not self.has_attention and not self.has_ffn

    def widened(self, hidden: int) -> Layer:
        """An attention-free parallel layer as the one wide FFN it equals (Theorem 3.1, each
        branch's norm folded into its rows): what TRT-LLM, which has no parallel blocks, runs."""
        if not self.branches or self.has_attention:
            return self
        ffns = [b.ffn for b in self.branches if b.has_ffn]
        if len({f.gated for f in ffns}) > 1 or any(f.kind is not FFNKind.SWIGLU for f in ffns):
            return self  # SwiGLU and plain MLP branches are not one wide FFN of either kind
        width = sum(f.width or 0 for f in ffns)
        return Layer(Attention(AttentionKind.NOOP),
                     FFN(FFNKind.SWIGLU, width, ffn_mult_for(width, hidden), gated=all(f.gated for f in ffns)))

    def sync_points(self) -> int:
        """All-reduces this layer needs per token under TP (see `ModelSpec.sync_points_per_token`).

        A parallel layer sums its branches' partial outputs in one all-reduce; branches that run
        an FFN after their attention need their attention outputs reduced first (one more, shared
        by all such branches). That is what fusing a run into one layer buys.
        """
        if not self.branches:
            return int(self.has_attention) + int(self.has_ffn)
        if self.is_empty:
            return 0
        return 1 + int(any(b.has_attention and b.has_ffn for b in self.branches))

    def short(self) -> str:
        """A compact label such as 'A8/F1024', '-/F4096', 'L/-', 'empty', 'P[-/F256 + -/F512]'
        (a parallel-blocks layer and its branches); a plain (non-gated) MLP is 'M4096'."""
        if self.branches:
            return "P[" + " + ".join(b.short() for b in self.branches) + "]"
        if self.is_empty:
            return "empty"
        a = {AttentionKind.FULL: f"A{self.attention.kv_heads}", AttentionKind.LINEAR: "L",
             AttentionKind.NOOP: "-"}[self.attention.kind]
        mlp = "F" if self.ffn.gated else "M"
        f = {FFNKind.SWIGLU: f"{mlp}{self.ffn.width}", FFNKind.LINEAR: "L", FFNKind.NOOP: "-"}[self.ffn.kind]
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


# ---- block_configs schemas: released Nemotron and Model-Optimizer's Puzzletron ----------------
# The released configs (Nemotron-51B/Super/Ultra) describe an FFN by `ffn_mult` and attention by
# `n_heads_in_group`. Puzzletron (NVIDIA/Model-Optimizer `modelopt/torch/puzzletron/block_config.py`)
# describes an FFN by `intermediate_size` (its FFNConfig asserts "Intermediate size must be provided
# for an FFN block"), and in its first release (`modelopt/torch/_compress/.../block_config.py`,
# 2025-11) also `gated` / `hidden_act` per FFN and the sink/window fields per attention; from
# 2026-01 attention says `num_key_value_heads` instead of `n_heads_in_group`. Its BlockConfig adds
# `parallel_blocks`, and subblocks carry `weights_precision`, `moe`, `mamba` and `llama4`.
RELEASED_ATTENTION_KEYS = ("n_heads_in_group", "no_op", "replace_with_linear", "sparsify", "num_sink_tokens",
                           "window_length", "unshifted_sink", "use_prefill_window_in_sink_attention")
RELEASED_FFN_KEYS = ("ffn_mult", "no_op", "replace_with_linear", "sparsify")
KNOWN_ATTENTION_KEYS = frozenset(RELEASED_ATTENTION_KEYS) | {"num_key_value_heads", "weights_precision",
                                                             "mamba", "llama4"}
KNOWN_FFN_KEYS = frozenset(RELEASED_FFN_KEYS) | {"intermediate_size", "weights_precision", "gated",
                                                 "hidden_act", "moe"}
KNOWN_BLOCK_KEYS = frozenset({"attention", "ffn", "parallel_blocks"})
# Keys whose value a writer computes from the Layer; every other key is written as the source had it.
_MODELED = {"attention": frozenset({"n_heads_in_group", "num_key_value_heads", "no_op", "replace_with_linear"}),
            "ffn": frozenset({"ffn_mult", "intermediate_size", "no_op", "replace_with_linear", "gated"})}
# Top-level keys transformers' LlamaConfig writes but Puzzletron's DeciLMConfig.to_dict removes
# (its PER_LAYER_ATTRIBUTE_MAPPING: they live per block there).
PER_LAYER_GLOBALS = ("intermediate_size", "num_key_value_heads", "hidden_act")

Kept = tuple[tuple[tuple[str, str, str], Any], ...]


@dataclass(frozen=True)
class BlockSchema:
    """Which `block_configs` keys the source wrote, so an HF config we write keeps them and loads
    with the source's own remote code (the released schema by default, as for a Llama source).

    `width_key` is how an FFN's width is said: `ffn_mult` (released; `intermediate_size` only where
    no ffn_mult gives the width) or `intermediate_size` (Puzzletron: always, never an ffn_mult).
    `kept` holds the values of keys no stage interprets (`weights_precision`, `hidden_act`, `moe`,
    ...) per (part, sublayer kind, key) as the source wrote them, so they are written back alike.
    """

    attention_keys: tuple[str, ...] = RELEASED_ATTENTION_KEYS
    ffn_keys: tuple[str, ...] = RELEASED_FFN_KEYS
    block_keys: tuple[str, ...] = ("attention", "ffn")
    width_key: str = "ffn_mult"
    per_layer_globals: bool = True  # the source wrote intermediate_size etc. at top level (as null)
    kept: Kept = ()

    @property
    def name(self) -> str:
        return "puzzletron" if self.width_key == "intermediate_size" else "released"

    def kept_value(self, part: str, kind: str, key: str) -> Any:
        """The source's value of an uninterpreted key for this kind of sublayer (else any kind's)."""
        for (p, k, name), value in self.kept:
            if (p, k, name) == (part, kind, key):
                return value
        for (p, _, name), value in self.kept:
            if (p, name) == (part, key):
                return value
        return None


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
    block_schema: BlockSchema = field(default_factory=BlockSchema, compare=False)
    # FP8 (ModelOpt per-tensor) or none: which linears are stored quantized, and the KV cache's dtype.
    quant: Quantization = field(default_factory=Quantization)
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

    def parallel_layers(self) -> list[int]:
        return [i for i, lay in enumerate(self.layers) if lay.is_parallel]

    def kv_cache_bytes_per_token(self, dtype: str | None = None) -> int:
        """K and V for every full-attention layer (parallel branches included); no-op and linear
        layers keep no cache."""
        per = DTYPE_BYTES[normalize_dtype(dtype or self.dtype)]
        subs = [b for lay in self.layers for b in (lay.branches or (lay,))]
        return sum(2 * lay.attention.kv_heads * self.head_dim * per  # type: ignore[operator]
                   for lay in subs if lay.attention.kind is AttentionKind.FULL)

    def unsupported(self, stage: str, *, parallel: bool = True, plain_mlp: bool = True,
                    ffn_only_parallel_ok: bool = False, attention_branches_ok: bool = False) -> list[str]:
        """One line per layer `stage` cannot express (a `parallel_blocks` layer, or with
        `ffn_only_parallel_ok` only one whose branches are not all attention-free FFNs; a non-gated
        MLP), naming the layer and the field, so no stage silently treats them as something else."""
        problems = []
        for i, lay in enumerate(self.layers):
            if parallel and lay.is_parallel:
                odd = [k for k, b in enumerate(lay.branches)
                       if (b.has_attention and not attention_branches_ok) or b.ffn.kind is FFNKind.LINEAR
                       or b.attention.kind is AttentionKind.LINEAR]
                if not ffn_only_parallel_ok:
                    problems.append(f"layer {i}: field 'parallel_blocks' ({len(lay.branches)} branches, "
                                    f"{lay.short()}): {stage} does not support parallel blocks")
                elif odd:
                    problems.append(f"layer {i}: field 'parallel_blocks' ({lay.short()}): branch {odd[0]} "
                                    f"({lay.branches[odd[0]].short()}) has "
                                    + ("a linear replacement" if attention_branches_ok else "attention or a linear FFN")
                                    + f"; {stage} runs only parallel blocks of "
                                    + ("attention and MLP branches" if attention_branches_ok
                                       else "attention-free MLP branches"))
            for k, sub in enumerate(lay.branches or (lay,)):
                if plain_mlp and sub.ffn.kind is FFNKind.SWIGLU and not sub.ffn.gated:
                    where = f"layer {i}" + (f" parallel_blocks.{k}" if lay.branches else "")
                    problems.append(f"{where} ffn: field 'gated' = false (a plain up -> silu -> down MLP): "
                                    f"{stage} supports only gated (SwiGLU) FFNs")
        return problems

    def refuse_unsupported(self, stage: str, **what: bool) -> None:
        """`unsupported` as one ConfigError (the first problem, and how many more)."""
        problems = self.unsupported(stage, **what)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(problems[0] + more)

    def sync_points_per_token(self) -> int:
        """The collectives one token's forward pass waits on under tensor parallelism (tp > 1).

        The one definition every command reports (inspect, fuse, evaluate, the benchmarks, which
        count the collectives the ranks actually issue): an all-reduce after every attention and
        every FFN sublayer (linear replacements included: they are row-split too), plus the
        all-gather of the vocab-split lm_head's logits. At tp = 1 there are none.
        """
        return sum(lay.sync_points() for lay in self.layers) + 1

    def widened(self) -> ModelSpec:
        """Every attention-free parallel_blocks layer as one wide FFN (`Layer.widened`)."""
        if not self.parallel_layers():
            return self
        return replace(self, layers=tuple(lay.widened(self.hidden) for lay in self.layers))

    def with_dtype(self, dtype: str) -> ModelSpec:
        return replace(self, dtype=normalize_dtype(dtype))

    def with_quant(self, quant: Quantization) -> ModelSpec:
        return replace(self, quant=quant)

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
        if not self.quant.is_none:  # ModelOpt mirrors hf_quant_config.json here
            cfg["quantization_config"] = self.quant.config_json()
        if not self.block_schema.per_layer_globals:  # Puzzletron's to_dict drops them
            for key in PER_LAYER_GLOBALS:
                cfg.pop(key)
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

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        return parse_hf_config(cfg)

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        """From a config.json file or a directory holding one; errors name the file."""
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        cfg = read_config_json(p)
        spec = parse_hf_config(cfg, where=str(p))
        quant_file = p.parent / HF_QUANT_CONFIG  # ModelOpt's, beside config.json; both must agree
        if not quant_file.is_file():
            return spec
        hf_quant = read_config_json(quant_file)
        return spec.with_quant(parse_quantization(hf_quant, cfg.get("quantization_config"), str(p), str(quant_file)))


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
                "attention_dropout",
                # Puzzletron's DeciLMConfig (checked by _check_puzzletron_globals)
                "position_embedding_type", "llama4_attn_implementation", "block_return_only_hidden_states",
                "router_aux_loss_coef", "router_z_loss_coef", "output_router_logits", "o_proj_bias")


def _check_puzzletron_globals(cfg: dict[str, Any], where: str) -> None:
    """Puzzletron's DeciLMConfig top-level fields that change the model: refused unless default."""
    pos = cfg.get("position_embedding_type")
    if pos not in (None, "rope"):
        raise _refuse(where, "position_embedding_type", pos, "only 'rope' is supported")
    if cfg.get("o_proj_bias"):
        raise _refuse(where, "o_proj_bias", cfg["o_proj_bias"], "biases are not supported")


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
    schema = BlockSchema()
    if is_deci and "block_configs" in cfg:
        layers, schema = _parse_block_configs(cfg, hidden, heads, where)
    else:
        layers = _uniform_layers(Fields(cfg, where), heads, n)
    _check_puzzletron_globals(cfg, where)
    if schema.name == "puzzletron" and "head_dim" not in cfg and hidden // heads != 128:
        # Its DeciLMConfig(head_dim=128) uses 128 when the key is absent (hidden // heads only
        # when it is null); the released code and transformers use hidden // heads.
        raise ConfigError(f"{where}: field 'head_dim' is missing: Puzzletron's DeciLMConfig then uses 128, "
                          f"other readers hidden_size // num_attention_heads = {hidden // heads}; "
                          f"write the intended head_dim")
    if n is not None and n != len(layers):
        raise ConfigError(f"{where}: num_hidden_layers is {n} but {len(layers)} layers are described")
    quant = parse_quantization(None, cfg.get("quantization_config"), where)
    return ModelSpec(
        hidden=hidden, heads=heads, head_dim=head_dim or hidden // heads, vocab=vocab, layers=tuple(layers),
        **rope, **scalars, dtype=normalize_dtype(dtype), architecture=DECILM if is_deci else LLAMA,
        block_schema=schema, quant=quant, passthrough={k: cfg[k] for k in _PASSTHROUGH if k in cfg},
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


def _parse_block_configs(cfg: dict[str, Any], hidden: int, heads: int,
                         where: str) -> tuple[list[Layer], BlockSchema]:
    blocks = cfg["block_configs"]
    if not isinstance(blocks, list):
        raise ConfigError(f"{where}: field 'block_configs' must be a list")
    seen = _SchemaSeen()
    layers = [_parse_block(b, f"layer {i}", hidden, heads, seen) for i, b in enumerate(blocks)]
    return layers, seen.schema(per_layer_globals=any(k in cfg for k in PER_LAYER_GLOBALS))


class _SchemaSeen:
    """The block_configs keys (in order) and the uninterpreted values a source used."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, None]] = {"attention": {}, "ffn": {}, "block": {}}
        self.kept: dict[tuple[str, str, str], Any] = {}
        self.by_mult = self.by_size = False

    def add(self, part: str, obj: dict[str, Any], kind: str) -> None:
        for key, value in obj.items():
            self.keys[part].setdefault(key, None)
            if key not in _MODELED.get(part, ()):
                self.kept.setdefault((part, kind, key), value)

    def schema(self, per_layer_globals: bool) -> BlockSchema:
        # Released configs always carry the ffn_mult key; Puzzletron's FFNConfig has none.
        puzzletron = ((self.by_size or "intermediate_size" in self.keys["ffn"])
                      and not self.by_mult and "ffn_mult" not in self.keys["ffn"])
        attention = tuple(self.keys["attention"]) or RELEASED_ATTENTION_KEYS
        ffn = tuple(self.keys["ffn"]) or RELEASED_FFN_KEYS
        needed_ffn = ("intermediate_size",) if puzzletron else ("ffn_mult",)
        return BlockSchema(
            attention_keys=_with(attention, ("no_op", "replace_with_linear")),
            ffn_keys=_with(ffn, (*needed_ffn, "no_op", "replace_with_linear")),
            block_keys=_with(tuple(self.keys["block"]), ("attention", "ffn")),
            width_key="intermediate_size" if puzzletron else "ffn_mult",
            per_layer_globals=per_layer_globals,
            kept=tuple(self.kept.items()))


def _with(keys: tuple[str, ...], needed: tuple[str, ...]) -> tuple[str, ...]:
    return keys + tuple(k for k in needed if k not in keys)


def _refuse(where: str, field_name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: field {field_name!r} = {value!r}: {why}")


def _unknown_keys(obj: dict[str, Any], known: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in known:
            raise ConfigError(f"{where}: field {key!r} is not part of the released nor the Puzzletron "
                              f"block_configs schema; refusing rather than ignoring it")


def _parse_block(block: Any, where: str, hidden: int, heads: int, seen: _SchemaSeen,
                 nested: bool = False) -> Layer:
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: block config must be an object with 'attention' and 'ffn'")
    _unknown_keys(block, KNOWN_BLOCK_KEYS, where)
    seen.add("block", {k: None for k in block}, "block")
    parallel = block.get("parallel_blocks")
    if parallel is not None:
        return _parse_parallel(block, parallel, where, hidden, heads, seen, nested)
    if "attention" not in block or "ffn" not in block:
        raise ConfigError(f"{where}: block config must be an object with 'attention' and 'ffn'")
    for part in ("attention", "ffn"):
        if not isinstance(block[part], dict):
            raise _refuse(where, part, block[part], "must be an object")
    attention = _parse_attention(block["attention"], f"{where} attention", heads)
    ffn = _parse_ffn(block["ffn"], f"{where} ffn", hidden, seen)
    seen.add("attention", block["attention"], attention.kind.value)
    seen.add("ffn", block["ffn"], ffn.kind.value)
    return Layer(attention, ffn)


def _parse_parallel(block: dict[str, Any], parallel: Any, where: str, hidden: int, heads: int,
                    seen: _SchemaSeen, nested: bool) -> Layer:
    """Puzzletron's `DeciLMMultiDecoderLayer`: each branch a whole decoder layer on the same input,
    output sum_k branch_k(x) - (n-1) x. It reads only `parallel_blocks`, so an outer attention or
    FFN that is not a no-op would be ignored by the source's own code: refused here."""
    if nested:
        raise _refuse(where, "parallel_blocks", "...", "parallel blocks inside a parallel block are not supported")
    if not isinstance(parallel, list) or not parallel:
        raise _refuse(where, "parallel_blocks", parallel, "must be a non-empty list of block configs")
    for part in ("attention", "ffn"):
        outer = block.get(part)
        if outer is not None and not (isinstance(outer, dict) and outer.get("no_op")):
            raise _refuse(where, part, outer, "a parallel_blocks layer runs only its branches; "
                                              "its own attention / ffn must be null or no_op")
    seen.kept.setdefault(("block", "parallel", "outer_null"), block.get("attention") is None)
    branches = tuple(_parse_block(b, f"{where} parallel_blocks.{k}", hidden, heads, seen, nested=True)
                     for k, b in enumerate(parallel))
    return Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.NOOP), branches)


def _subblock_common(a: dict[str, Any], where: str) -> None:
    """Fields every Puzzletron subblock has (SubblockConfig)."""
    precision = a.get("weights_precision")
    if precision not in (None, "bf16"):
        # The default; no code in Model-Optimizer reads it, so no other value has a defined meaning.
        raise _refuse(where, "weights_precision", precision,
                      "only 'bf16' (Puzzletron's default, which its code never reads) is understood")
    for key in ("no_op", "replace_with_linear"):
        if a.get(key) is not None and not isinstance(a[key], bool):
            raise _refuse(where, key, a[key], "must be true or false")
    if a.get("no_op") and a.get("replace_with_linear"):
        raise ConfigError(f"{where}: fields 'no_op' and 'replace_with_linear' are both true")


def _parse_attention(a: dict[str, Any], where: str, heads: int) -> Attention:
    _unknown_keys(a, KNOWN_ATTENTION_KEYS, where)
    _subblock_common(a, where)
    if a.get("sparsify"):
        raise _refuse(where, "sparsify", a["sparsify"], "sparse attention is not supported")
    for key in ("window_length", "num_sink_tokens"):
        if a.get(key) is not None:
            raise _refuse(where, key, a[key], "sliding-window / sink attention is not supported")
    for key in ("use_prefill_window_in_sink_attention", "unshifted_sink"):
        if a.get(key):
            raise _refuse(where, key, a[key], "sink attention is not supported")
    if a.get("mamba") is not None:
        raise _refuse(where, "mamba", a["mamba"], "Mamba (state-space) mixers are not supported")
    if a.get("llama4") is not None:
        raise _refuse(where, "llama4", a["llama4"], "Llama-4 attention (chunked, qk-norm, temperature "
                                                    "tuning) is not supported")
    if a.get("no_op"):
        return Attention(AttentionKind.NOOP)
    if a.get("replace_with_linear"):
        return Attention(AttentionKind.LINEAR)
    group, kv = a.get("n_heads_in_group"), a.get("num_key_value_heads")
    if kv is not None:  # Puzzletron since 2026-01 says the kv-head count itself
        if not is_int(kv) or kv <= 0:
            raise _refuse(where, "num_key_value_heads", kv, "must be a positive integer")
        if heads % kv:
            raise _refuse(where, "num_key_value_heads", kv, f"does not divide {heads} heads")
        if group is not None and group != heads // kv:
            raise _refuse(where, "n_heads_in_group", group, f"disagrees with num_key_value_heads {kv}")
        return Attention(AttentionKind.FULL, kv)
    if not is_int(group) or group <= 0:
        raise _refuse(where, "n_heads_in_group", group, "must be a positive integer")
    if heads % group:
        raise _refuse(where, "n_heads_in_group", group, f"does not divide {heads} heads")
    return Attention(AttentionKind.FULL, heads // group)


def _parse_ffn(f: dict[str, Any], where: str, hidden: int, seen: _SchemaSeen | None = None) -> FFN:
    _unknown_keys(f, KNOWN_FFN_KEYS, where)
    _subblock_common(f, where)
    if f.get("sparsify"):
        raise _refuse(where, "sparsify", f["sparsify"], "sparse FFNs are not supported")
    act = f.get("hidden_act")
    if act is not None and act != "silu":
        raise _refuse(where, "hidden_act", act, "only 'silu' (SwiGLU) is supported")
    if f.get("no_op"):
        return FFN(FFNKind.NOOP)
    if f.get("moe") is not None:
        raise _refuse(where, "moe", f["moe"], "mixture-of-experts FFNs are not supported")
    if f.get("replace_with_linear"):
        return FFN(FFNKind.LINEAR)
    gated = f.get("gated", True)
    if gated is None:
        gated = True  # Puzzletron's default (`gated: Optional[bool] = True`)
    if not isinstance(gated, bool):
        raise _refuse(where, "gated", gated, "must be true or false")
    mult = f.get("ffn_mult")
    if mult is None and f.get("intermediate_size") is not None:
        width = f["intermediate_size"]
        if not is_int(width) or width <= 0:
            raise _refuse(where, "intermediate_size", width, "must be a positive integer")
        if seen is not None:
            seen.by_size = True
        return FFN(FFNKind.SWIGLU, width, gated=gated)
    if not is_number(mult) or not math.isfinite(mult) or mult <= 0:
        raise _refuse(where, "ffn_mult", mult, "must be a positive number")
    if seen is not None:
        seen.by_mult = True
    return FFN(FFNKind.SWIGLU, ffn_mult_to_width(mult, hidden), float(mult), gated=gated)


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


def parse_rope_scaling(obj: Any, where: str) -> RopeScaling | None:
    """A RoPE scaling object on its own (TRT-LLM's `rotary_scaling` is one: `to_hf()` plus `type`),
    read by the same rules as an HF config's; one ConfigError naming `where` and the field."""
    if obj is not None and not isinstance(obj, dict):
        raise ConfigError(f"{where}: must be an object or null, got {obj!r}")
    f = Fields(obj or {}, where)
    scaling = _parse_scaling(f, obj, where)
    f.raise_if_any()
    return scaling


def _parse_scaling(f: Fields, obj: dict[str, Any] | None, name: str) -> RopeScaling | None:
    """The one reader of a scaling object (HF `rope_scaling` / `rope_parameters`, TRT-LLM
    `rotary_scaling`): llama3 or none; problems go to `f`."""
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
    """One `block_configs` entry in the source's schema (`spec.block_schema`): its keys, in its
    order, each modeled value computed from `lay`, every other value as the source wrote it."""
    schema = spec.block_schema
    if lay.branches:
        # Outer parts as the source wrote them: null (BlockConfig's default), else no-op subblocks
        # (what the first Puzzletron DeciLMConfig needs: it reads every block's attention).
        null = schema.kept_value("block", "parallel", "outer_null") is True
        parts: dict[str, Any] = ({"attention": None, "ffn": None} if null else
                                 {"attention": _attention_config(lay.attention, spec),
                                  "ffn": _ffn_config(lay.ffn, spec)})
        parts["parallel_blocks"] = [_block_config(b, spec) for b in lay.branches]
        return {k: parts.get(k) for k in _with(schema.block_keys, ("parallel_blocks",))}
    out = {"attention": _attention_config(lay.attention, spec), "ffn": _ffn_config(lay.ffn, spec)}
    return {k: out.get(k) for k in schema.block_keys}


def _attention_config(a: Attention, spec: ModelSpec) -> dict[str, Any]:
    full = a.kind is AttentionKind.FULL
    modeled = {"n_heads_in_group": spec.heads // a.kv_heads if full else None,  # type: ignore[operator]
               "num_key_value_heads": a.kv_heads if full else None,
               "no_op": a.kind is AttentionKind.NOOP, "replace_with_linear": a.kind is AttentionKind.LINEAR}
    keys = spec.block_schema.attention_keys
    if full and not {"n_heads_in_group", "num_key_value_heads"} & set(keys):
        keys = ("n_heads_in_group", *keys)
    return {k: modeled[k] if k in modeled else _kept("attention", a.kind.value, k, spec) for k in keys}


def _ffn_config(f: FFN, spec: ModelSpec) -> dict[str, Any]:
    schema = spec.block_schema
    mlp = f.kind is FFNKind.SWIGLU
    modeled: dict[str, Any] = {"no_op": f.kind is FFNKind.NOOP, "replace_with_linear": f.kind is FFNKind.LINEAR,
                               "ffn_mult": None, "intermediate_size": None}
    extra: dict[str, Any] = {}
    if mlp:
        modeled["gated"] = f.gated
        if schema.width_key == "intermediate_size":
            modeled["intermediate_size"] = f.width
        else:
            assert f.width is not None
            mult = f.ffn_mult if f.ffn_mult is not None else ffn_mult_for(f.width, spec.hidden)
            if mult is None:  # vLLM and our parser read it; TRT-LLM's PyTorch backend needs ffn_mult
                modeled["intermediate_size"] = extra["intermediate_size"] = f.width
            elif ffn_mult_to_width(mult, spec.hidden) != f.width:
                raise ConfigError(f"ffn_mult {mult} does not give width {f.width}")
            modeled["ffn_mult"] = mult
        if not f.gated and "gated" not in schema.ffn_keys:
            extra["gated"] = False
    keys = _with(schema.ffn_keys, tuple(extra))
    return {k: modeled[k] if k in modeled else _kept("ffn", f.kind.value, k, spec) for k in keys}


def _kept(part: str, kind: str, key: str, spec: ModelSpec) -> Any:
    """An uninterpreted key's value: the source's; the released schema's defaults otherwise."""
    value = spec.block_schema.kept_value(part, kind, key)
    if value is None and not spec.block_schema.kept and key in ("unshifted_sink",
                                                                "use_prefill_window_in_sink_attention"):
        return False
    return value

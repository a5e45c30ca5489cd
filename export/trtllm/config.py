"""The TRT-LLM checkpoint config.json (`DeciConfig`), written from and read back into a ModelSpec.

TRT-LLM's format lives here: `layer_configs` and the rotary fields are rendered from the spec's
model description, and `rotary_scaling` is read back with the spec's one RoPE-scaling parser.

Only keys `DeciConfig(**cfg)` accepts in every release up to 1.3.0rc20 are written: `mapping`
and `quantization` hold only their minimal sub-keys (unknown sub-keys raise TypeError in some
versions) and `layer_configs` entries only `impl` plus kv heads / intermediate size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.errors import ConfigError
from export.mapping import Mapping
from export.quantization import KV_CACHE_ALGOS, QUANT_ALGOS, Quantization
from export.spec import (
    DECILM,
    FFN,
    TRTLLM_STAGE,
    Attention,
    AttentionKind,
    FFNKind,
    Layer,
    ModelSpec,
    RopeScaling,
    normalize_dtype,
    parse_rope_scaling,
)

REQUIRED = ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "hidden_act", "max_position_embeddings", "layer_configs", "mapping")
LAYER_KEYS = {"attention": {"impl", "num_key_value_heads"}, "ffn": {"impl", "intermediate_size"}}
MAPPING_KEYS = {"world_size", "tp_size", "pp_size"}


def trtllm_config(spec: ModelSpec, mapping: Mapping, dtype: str) -> dict[str, Any]:
    """config.json for a TRT-LLM `DeciLMForCausalLM` checkpoint of `spec` at `mapping`."""
    kvs = [spec.layers[i].attention.kv_heads for i in spec.attention_layers()]
    widths = [lay.ffn.width for lay in spec.layers if lay.ffn.width is not None]
    return {
        "architecture": DECILM, "dtype": normalize_dtype(dtype), "logits_dtype": "float32",
        "vocab_size": spec.vocab, "hidden_size": spec.hidden, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": max(kvs, default=spec.heads),
        "head_size": spec.head_dim, "intermediate_size": max(widths, default=4 * spec.hidden),
        "hidden_act": "silu", "norm_epsilon": spec.norm_eps, "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": spec.max_position_embeddings, "rotary_base": spec.rope_theta,
        "rotary_scaling": _rotary_scaling(spec.rope_scaling),
        "mapping": mapping.to_trtllm(), "quantization": trtllm_quantization(spec, mapping),
        # read by every TRT-LLM model, DeciLM included: `PretrainedModel.__post_init__` runs
        # `optimize_model(use_parallel_embedding=...)`, whose `parallelize_embedding` rebuilds each
        # Embedding with tp_size/tp_rank/sharding_dim before the rank file is loaded
        "use_parallel_embedding": mapping.parallel_embedding,
        "embedding_sharding_dim": mapping.embedding_shard if mapping.parallel_embedding else 0,
        "layer_configs": trtllm_layer_configs(spec),
    }


def trtllm_quantization(spec: ModelSpec, mapping: Mapping) -> dict[str, Any]:
    """`quantization` as TRT-LLM 1.2.1's `QuantConfig` fields (`models/modeling_utils.py`): the
    algorithms, and for FP8 weights the linears left in the model dtype, by TRT-LLM module name."""
    q = {"quant_algo": spec.quant.algo, "kv_cache_quant_algo": spec.quant.kv_cache}
    if not spec.quant.fp8:
        return q
    from export.trtllm.rank_layout import excluded_modules  # imports torch: only for FP8 descriptions

    return {**q, "exclude_modules": excluded_modules(spec, mapping)}


def parse_trtllm_quantization(cfg: Any, spec: ModelSpec, mapping: Mapping, where: str) -> Quantization:
    """`quantization` read back: FP8 per-tensor (and an FP8 KV cache) or none; anything else is
    refused by field. `exclude_modules` becomes the HF modules it leaves unquantized."""
    if cfg is None:
        return Quantization()
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: field 'quantization' must be an object, got {cfg!r}")
    algo, kv, ex = cfg.get("quant_algo"), cfg.get("kv_cache_quant_algo"), cfg.get("exclude_modules")
    if algo not in (None, *QUANT_ALGOS):
        raise ConfigError(f"{where}: field 'quantization.quant_algo' is {algo!r}: only per-tensor 'FP8' (or null) "
                          f"is read")
    if kv not in (None, *KV_CACHE_ALGOS):
        raise ConfigError(f"{where}: field 'quantization.kv_cache_quant_algo' is {kv!r}: only 'FP8' (or null) is read")
    if ex is not None and (not isinstance(ex, list) or not all(isinstance(x, str) for x in ex)):
        raise ConfigError(f"{where}: field 'quantization.exclude_modules' must be a list of module names, got {ex!r}")
    if not algo:
        return Quantization(algo, kv)
    from export.trtllm.rank_layout import hf_excludes  # imports torch: only for FP8 checkpoints

    return Quantization(algo, kv, hf_excludes(spec, mapping, ex))


def trtllm_layer_configs(spec: ModelSpec) -> list[dict[str, Any]]:
    """`layer_configs` entries with only the keys TRT-LLM's dataclasses accept (parsed back by
    `_parse_layers`); a layer nemotron_nas cannot express is refused, naming it."""
    spec.refuse_unsupported(TRTLLM_STAGE)
    return [{"attention": {"impl": lay.attention.kind.value,
                           "num_key_value_heads": lay.attention.kv_heads},
             "ffn": {"impl": lay.ffn.kind.value, "intermediate_size": lay.ffn.width}}
            for lay in spec.layers]


def _rotary_scaling(rs: RopeScaling | None) -> dict[str, Any] | None:
    """Both `type` (read by TRT-LLM 0.11's trtllm-build) and `rope_type` (later releases)."""
    return None if rs is None else {**rs.to_hf(), "type": "llama3"}


def write_trtllm_config(directory: Path, spec: ModelSpec, mapping: Mapping, dtype: str) -> dict[str, Any]:
    cfg = trtllm_config(spec, mapping, dtype)
    (Path(directory) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def read_trtllm_config(path: Path) -> tuple[ModelSpec, Mapping]:
    """(spec, mapping) from a checkpoint's config.json; every problem reported at once."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot read a TRT-LLM config ({e})") from None
    return parse_trtllm_config(cfg, str(p))


def parse_trtllm_config(cfg: dict[str, Any], where: str = "config") -> tuple[ModelSpec, Mapping]:
    problems = [f"required field {k!r} is missing" for k in REQUIRED if cfg.get(k) is None]
    if not problems and cfg["architecture"] != DECILM:
        problems.append(f"field 'architecture' is {cfg['architecture']!r}, expected {DECILM!r}")
    if not problems and cfg["hidden_act"] != "silu":
        problems.append(f"field 'hidden_act' is {cfg['hidden_act']!r}; only 'silu' is supported")
    layers = [] if problems else _parse_layers(cfg["layer_configs"], cfg["num_hidden_layers"], problems)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    m = cfg["mapping"]
    dim = cfg.get("embedding_sharding_dim", 0)
    if cfg.get("use_parallel_embedding") and dim not in (0, 1):
        raise ConfigError(f"{where}: embedding_sharding_dim is {dim!r}; TRT-LLM accepts 0 (vocab) or 1 (hidden)")
    mapping = Mapping(int(m.get("tp_size", 1)), int(m.get("pp_size", 1)),
                      embedding_shard=dim if cfg.get("use_parallel_embedding") else None)
    if m.get("world_size", mapping.world_size) != mapping.world_size:
        raise ConfigError(f"{where}: mapping.world_size {m['world_size']} != tp_size * pp_size")
    heads = cfg["num_attention_heads"]
    spec = ModelSpec(
        hidden=cfg["hidden_size"], heads=heads, head_dim=cfg.get("head_size") or cfg["hidden_size"] // heads,
        vocab=cfg["vocab_size"], layers=tuple(layers), rope_theta=float(cfg.get("rotary_base", 10000.0)),
        rope_scaling=parse_rope_scaling(cfg.get("rotary_scaling"), f"{where}: rotary_scaling"),
        norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
        tie_embeddings=False, dtype=normalize_dtype(cfg["dtype"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]), architecture=DECILM)
    return spec.with_quant(parse_trtllm_quantization(cfg.get("quantization"), spec, mapping, where)), mapping


def _parse_layers(entries: Any, n: int, problems: list[str]) -> list[Layer]:
    if not isinstance(entries, list) or len(entries) != n:
        problems.append(f"layer_configs must be a list of num_hidden_layers={n} entries")
        return []
    layers = []
    for i, e in enumerate(entries):
        bad = [f"{part}.{k}" for part, keys in LAYER_KEYS.items() for k in (e.get(part) or {}) if k not in keys]
        if set(e) != set(LAYER_KEYS) or bad:
            problems.append(f"layer {i}: layer_configs entry has keys {sorted(e)} {bad or ''}; "
                            f"allowed: attention.{{impl, num_key_value_heads}}, ffn.{{impl, intermediate_size}}")
            continue
        try:
            a, f = e["attention"], e["ffn"]
            kind = AttentionKind(a["impl"])
            fkind = FFNKind(f["impl"])
        except (KeyError, ValueError) as err:
            problems.append(f"layer {i}: bad impl ({err})")
            continue
        kv = a.get("num_key_value_heads") if kind is AttentionKind.FULL else None
        width = f.get("intermediate_size") if fkind is FFNKind.SWIGLU else None
        if kind is AttentionKind.FULL and not isinstance(kv, int):
            problems.append(f"layer {i}: attention.num_key_value_heads must be an integer, got {kv!r}")
        if fkind is FFNKind.SWIGLU and not isinstance(width, int):
            problems.append(f"layer {i}: ffn.intermediate_size must be an integer, got {width!r}")
        layers.append(Layer(Attention(kind, kv), FFN(fkind, width)))
    return layers



"""What a checkpoint's quantization is (part of the model description), and the FP8 E4M3 numerics.

The description is ModelOpt's, the format NVIDIA publishes Ultra in
(`nvidia/Llama-3_1-Nemotron-Ultra-253B-v1-FP8`) and vLLM and TensorRT-LLM's PyTorch backend load:
`hf_quant_config.json` `{"producer": ..., "quantization": {"quant_algo": "FP8",
"kv_cache_quant_algo": "FP8" | null, "exclude_modules": ["lm_head", ...]}}`, mirrored in
config.json `quantization_config` (`quant_method: "modelopt"`). Per-tensor FP8: each quantized
linear stores its weight in float8_e4m3fn with a float32 `weight_scale` and `input_scale`
(x ~= x_fp8 * scale); an FP8 KV cache adds `k_scale` / `v_scale` per attention layer.
docs/fp8.md has the sources.

The E4M3 numerics every stage shares are `export.fp8` (this module stays free of torch, so
`inspect` stays light).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from export.errors import ConfigError

FP8 = "FP8"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = "float8_e4m3fn"
QUANT_ALGOS = (FP8,)  # weights (ModelOpt also has NVFP4, W4A8_AWQ, ...: refused, not misread)
KV_CACHE_ALGOS = (FP8,)
HF_QUANT_CONFIG = "hf_quant_config.json"
PRODUCER = {"name": "modelopt", "version": "0.37.0"}  # the format version written (see docs/fp8.md)


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's quantization: none (`algo` None), or per-tensor FP8 weights and activations,
    optionally with an FP8 KV cache. `exclude` holds ModelOpt's `exclude_modules` patterns (HF
    module names, `*` wildcards), e.g. `lm_head`: those linears stay in the model dtype."""

    algo: str | None = None
    kv_cache: str | None = None
    exclude: tuple[str, ...] = ()
    producer: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def fp8(self) -> bool:
        return self.algo == FP8

    @property
    def fp8_kv(self) -> bool:
        return self.kv_cache == FP8

    @property
    def is_none(self) -> bool:
        return self.algo is None and self.kv_cache is None

    def excludes(self, module: str) -> bool:
        """Is HF module `module` (e.g. `model.layers.3.mlp.down_proj`) left unquantized? A pattern
        matches the module itself, with `*` wildcards (fnmatch, as ModelOpt and vLLM match), or any
        module under it (`model.layers.0` excludes that layer's linears)."""
        return any(fnmatchcase(module, p) or fnmatchcase(module, p + ".*") for p in self.exclude)

    def hf_quant_config(self) -> dict[str, Any]:
        """hf_quant_config.json as ModelOpt's unified HF export writes it."""
        return {"producer": self.producer or dict(PRODUCER),
                "quantization": {"quant_algo": self.algo, "kv_cache_quant_algo": self.kv_cache,
                                 "exclude_modules": list(self.exclude)}}

    def config_json(self) -> dict[str, Any]:
        """config.json `quantization_config` (what transformers >= 4.5x and vLLM read first)."""
        return {"quant_method": "modelopt", "quant_algo": self.algo, "kv_cache_quant_algo": self.kv_cache,
                "exclude_modules": list(self.exclude), "producer": self.producer or dict(PRODUCER)}

    def describe(self) -> str:
        if self.is_none:
            return "none"
        kv = f", KV cache {self.kv_cache}" if self.kv_cache else ""
        ex = f", excluded: {', '.join(self.exclude)}" if self.exclude else ""
        return f"{self.algo} per-tensor{kv}{ex}"


NONE = Quantization()
RECIPE_EXCLUDE = ("lm_head",)  # what ModelOpt's FP8 recipe leaves unquantized (its exclude_modules default)


def refusal(where: str, what: str, quant: Quantization) -> str:
    """The one line a stage without FP8 (the ONNX graph and its runtime) refuses a quantized
    checkpoint with: what the checkpoint is, and where FP8 runs instead."""
    return (f"{where} is quantized ({quant.describe()}); {what} has no FP8 (it is emulated in the torch "
            f"runtime only): use --runtime torch")


def fp8_recipe(weights: bool = True, kv_cache: bool = False, exclude: tuple[str, ...] = RECIPE_EXCLUDE) -> Quantization:
    """ModelOpt's per-tensor FP8 recipe for planning: FP8 linears (lm_head excluded) and/or an FP8
    KV cache; neither is no quantization."""
    return Quantization(FP8 if weights else None, FP8 if kv_cache else None, exclude if weights else ())


def parse_quantization(hf_quant: dict[str, Any] | None, config_qc: Any, where: str,
                       quant_file: str = HF_QUANT_CONFIG) -> Quantization:
    """The quantization of a checkpoint from its hf_quant_config.json (`hf_quant`, parsed) and its
    config.json `quantization_config`; when both are there they must agree. Anything but ModelOpt
    FP8 is refused by name (a misread quantized checkpoint would serve garbage)."""
    parsed = []
    if hf_quant is not None:
        body = hf_quant.get("quantization") if isinstance(hf_quant, dict) else None
        if not isinstance(body, dict):
            raise ConfigError(f"{quant_file}: field 'quantization' must be an object with quant_algo, "
                              f"kv_cache_quant_algo and exclude_modules")
        parsed.append((quant_file, _one(body, quant_file, hf_quant.get("producer"))))
    if config_qc is not None:
        if not isinstance(config_qc, dict):
            raise ConfigError(f"{where}: field 'quantization_config' must be an object, got {config_qc!r}")
        method = config_qc.get("quant_method", "modelopt")
        if method != "modelopt":
            raise ConfigError(f"{where}: field 'quantization_config.quant_method' is {method!r}: only ModelOpt "
                              f"FP8 checkpoints ('modelopt') are read")
        parsed.append((f"{where} quantization_config", _one(config_qc, f"{where} quantization_config",
                                                            config_qc.get("producer"))))
    if not parsed:
        return NONE
    if len(parsed) == 2 and parsed[0][1] != parsed[1][1]:
        (a, qa), (b, qb) = parsed
        raise ConfigError(f"{a} says {qa.describe()} but {b} says {qb.describe()}: the two must agree")
    return parsed[0][1]


def _one(body: dict[str, Any], where: str, producer: Any) -> Quantization:
    algo = body.get("quant_algo")
    if algo not in (None, *QUANT_ALGOS):
        raise ConfigError(f"{where}: field 'quant_algo' is {algo!r}: only per-tensor 'FP8' (or null) is supported")
    kv = body.get("kv_cache_quant_algo")
    if kv not in (None, *KV_CACHE_ALGOS):
        raise ConfigError(f"{where}: field 'kv_cache_quant_algo' is {kv!r}: only 'FP8' (or null) is supported")
    ex = body.get("exclude_modules") or []
    if not isinstance(ex, list) or not all(isinstance(p, str) and p for p in ex):
        raise ConfigError(f"{where}: field 'exclude_modules' must be a list of module names, got {ex!r}")
    return Quantization(algo, kv, tuple(ex), producer if isinstance(producer, dict) else {})

"""Calibration for post-training FP8: amaxes from the reference runtime, then the scales.

ModelOpt's FP8 recipe ("max" calibration, `mtq.FP8_DEFAULT_CFG`), which NVIDIA's FP8 Ultra was made
with: every quantized linear's weight scale is amax(|W|) / 448 and its input (activation) scale
is amax(|x|) / 448 over the calibration tokens, run through the unquantized model; with an FP8 KV
cache, k (after RoPE) and v get amax / 448 each. We observe the inputs through `Decoder.observe`,
the reference runtime's calibration hook, so every block kind it runs (linear replacements,
Puzzletron parallel blocks) is calibrated the way it executes.

Linears that read the same input are deployed fused (TRT-LLM and vLLM run q/k/v as one qkv GEMM,
gate/up as one gate_up GEMM), and a fused GEMM has one weight scale and one input scale. ModelOpt's
export gives such a group one shared weight amax and one shared input amax (the max over the
group: `requantize_resmooth_fused_llm_layers` -> `preprocess_linear_fusion`,
modelopt/torch/export/unified_export_hf.py and quant_utils.py), so a loader fuses them without
requantizing. We do the same (`SHARED_INPUT`); docs/fp8.md has the sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from export import fp8
from export.errors import ExportError
from export.io.reader import CheckpointReader
from export.progress import item_progress
from export.spec import ModelSpec
from export.tensors import Role, ScaleKind, ScaleRef, TensorRef, is_fp8, model_tensors, module_name, scale_refs

# Linears of one (layer, branch) that share their input and are fused for deployment.
SHARED_INPUT: tuple[frozenset[Role], ...] = (frozenset({Role.Q, Role.K, Role.V}), frozenset({Role.GATE, Role.UP}))
CHUNK_BYTES = 64 << 20  # weights are read in row chunks of about this size

LinearKey = tuple  # (role, layer) or (role, layer, branch): the runtime's key for a linear


def linear_key(role: Role, layer: int | None, branch: int | None = None) -> LinearKey:
    return (role, layer) if branch is None else (role, layer, branch)


def kv_key(layer: int | None, branch: int | None = None) -> object:
    """The runtime's key for an attention's KV cache: the layer, or (layer, branch)."""
    return layer if branch is None else (layer, branch)


@dataclass
class Amaxes:
    """What the calibration run saw: the amax of each linear's input and of each k / v."""

    inputs: dict[LinearKey, float] = field(default_factory=dict)
    kv: dict[tuple[ScaleKind, object], float] = field(default_factory=dict)
    tokens: int = 0

    def record(self, key: object, x: torch.Tensor) -> None:
        """`Decoder.observe`: keys are a linear's, or (ScaleKind.K | V, attention key)."""
        table = self.kv if isinstance(key, tuple) and isinstance(key[0], ScaleKind) else self.inputs
        a = float(x.detach().abs().amax()) if x.numel() else 0.0
        table[key] = max(a, table.get(key, 0.0))  # type: ignore[index]


def row_chunks(reader: CheckpointReader, ref: TensorRef) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of a stored tensor in chunks of about CHUNK_BYTES (a fused Ultra FFN
    weight is 13 GiB in bf16: never read whole)."""
    sl = reader.get_slice(ref.hf_name)
    row = max(1, math.prod(ref.shape[1:])) * reader.info(ref.hf_name).dtype.itemsize
    step = max(1, CHUNK_BYTES // row)
    for r in range(0, ref.shape[0], step):
        yield r, sl[r:r + step]


def weight_amax(reader: CheckpointReader, ref: TensorRef) -> float:
    """amax(|W|) of one stored weight."""
    return max(float(rows.float().abs().amax()) for _, rows in row_chunks(reader, ref))


def fp8_linears(spec: ModelSpec) -> list[TensorRef]:
    """The weights the (quantized) description stores in FP8."""
    return [r for r in model_tensors(spec) if is_fp8(spec, r)]


def weight_amaxes(reader: CheckpointReader, spec: ModelSpec, progress: bool = True) -> dict[LinearKey, float]:
    refs = fp8_linears(spec)
    bar = item_progress(len(refs), "weight amax", unit="tensor", enabled=progress)
    out = {}
    for ref in refs:
        out[linear_key(ref.role, ref.layer, ref.branch)] = weight_amax(reader, ref)
        bar.update()
    bar.close()
    return out


def scale_group(ref: TensorRef | ScaleRef) -> tuple:
    """Which shared-scale group a linear is in: its fused group (q/k/v, gate/up of one layer or
    branch), or itself."""
    for i, roles in enumerate(SHARED_INPUT):
        if ref.role in roles:
            return (ref.layer, ref.branch, i)
    return (ref.layer, ref.branch, ref.role)


def _as_stored(scale: float) -> float:
    """The scale as the float32 tensor the checkpoint stores holds it, so the weights are
    quantized with exactly the value a loader dequantizes them with."""
    return float(torch.tensor(scale, dtype=torch.float32))


def _group_max(refs: Iterable[TensorRef], amax: dict[LinearKey, float], what: str) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for ref in refs:
        a = amax.get(linear_key(ref.role, ref.layer, ref.branch))
        if a is None:
            raise ExportError(f"{module_name(ref)}: the calibration run never reached this linear ({what})")
        if not math.isfinite(a):
            raise ExportError(f"{module_name(ref)}: {what} amax is {a}; the model produces non-finite values "
                              f"on the calibration text")
        g = scale_group(ref)
        out[g] = max(a, out.get(g, 0.0))
    return out


def fp8_scales(spec: ModelSpec, weights: dict[LinearKey, float], amaxes: Amaxes) -> dict[ScaleRef, float]:
    """Every scale the quantized description `spec` needs (`tensors.scale_refs`): weight and input
    scale per FP8 linear, shared across each fused group; k / v scale per attention with an FP8 KV cache."""
    refs = fp8_linears(spec)
    group_w = _group_max(refs, weights, "weight")
    group_x = _group_max(refs, amaxes.inputs, "input")
    out: dict[ScaleRef, float] = {}
    for s in scale_refs(spec):
        if s.kind is ScaleKind.WEIGHT:
            amax = group_w[scale_group(s)]
        elif s.kind is ScaleKind.INPUT:
            amax = group_x[scale_group(s)]
        else:
            amax = amaxes.kv.get((s.kind, kv_key(s.layer, s.branch)), math.nan)
            if not math.isfinite(amax):
                raise ExportError(f"{s.name}: no finite {s.kind.value} amax from the calibration run")
        out[s] = _as_stored(fp8.scale_for(amax))
    return out

"""FP8 scales of TRT-LLM tensors that pack several HF linears (q, k, v -> `attention.qkv`).

A packed tensor has one weight scale and one activation scale, so its parts are requantized to the
max of their weight scales and share the max of their input scales: what TRT-LLM 1.2.1 does itself
when it loads a ModelOpt HF checkpoint (`FP8Linear.postprocess` for `is_qkv`, quantization/layers.py:
dequantize each part with its scale, divide by the max, cast to E4M3). ModelOpt writes q/k/v with
equal scales, so this is exact there; otherwise the change is measured (`RequantError`).

The same rule serves three readers: the converter (what it writes), the rank-file reader (which
scale a q, k or v `ScaleRef` reads), and `verify` (`RequantizedWeights`: the HF source as the rank
files hold it, so the comparison stays exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from export import fp8
from export.mapping import Mapping
from export.spec import ModelSpec
from export.tensors import Role, ScaleKind, ScaleRef, TensorRef, is_fp8, model_tensors
from export.trtllm.names import packed_parts
from export.trtllm.rank_layout import ScaleValue, kv_scale_refs

Key = tuple[Role, int | None, int | None]  # (role, layer, branch)


def scale_value(value: ScaleValue, scale_of: Callable[[ScaleRef], float]) -> float:
    """A rank-file scale from the source's: the max of its refs (or that max's reciprocal)."""
    v = max(scale_of(r) for r in value.refs)
    return 1.0 / v if value.reciprocal else v


def shared(ref: ScaleRef) -> tuple[ScaleRef, ...]:
    """The source scales a part's scale is the max of: the same kind over its packed group (a K or
    V cache scale: the layer's K and V)."""
    if ref.kind in (ScaleKind.K, ScaleKind.V):
        return kv_scale_refs(ref.layer, ref.branch)
    return tuple(ScaleRef(ref.kind, r, ref.layer, ref.branch) for r in packed_parts(ref.role))


def requant_plan(spec: ModelSpec, scale_of: Callable[[ScaleRef], float]) -> dict[Key, tuple[float, float]]:
    """(own weight scale, packed weight scale) of every FP8 part of a packed tensor whose scale
    changes; an empty dict when every group's scales are equal (the exact case)."""
    out: dict[Key, tuple[float, float]] = {}
    for ref in model_tensors(spec):
        if len(packed_parts(ref.role)) > 1 and is_fp8(spec, ref):
            own = scale_of(ScaleRef(ScaleKind.WEIGHT, ref.role, ref.layer, ref.branch))
            new = max(scale_of(r) for r in shared(ScaleRef(ScaleKind.WEIGHT, ref.role, ref.layer, ref.branch)))
            if new != own:
                out[(ref.role, ref.layer, ref.branch)] = (own, new)
    return out


@dataclass
class RequantError:
    """The largest change requantization made to a dequantized weight, per layer: absolute, and
    relative to that layer's largest |weight| among the changed parts."""

    abs_err: dict[int | None, float] = field(default_factory=dict)
    amax: dict[int | None, float] = field(default_factory=dict)

    def add(self, layer: int | None, before: torch.Tensor, scale: float, after: torch.Tensor, new: float) -> None:
        old, now = fp8.dequantize(before, scale), fp8.dequantize(after, new)
        self.record(layer, float((now - old).abs().max()) if old.numel() else 0.0,
                    float(old.abs().max()) if old.numel() else 0.0)

    def record(self, layer: int | None, abs_err: float, amax: float) -> None:
        self.abs_err[layer] = max(self.abs_err.get(layer, 0.0), abs_err)
        self.amax[layer] = max(self.amax.get(layer, 0.0), amax)

    @property
    def layers(self) -> list[int | None]:
        return sorted(self.abs_err, key=lambda x: -1 if x is None else x)

    def max_relative(self) -> float:
        return max((self.abs_err[k] / self.amax[k] for k in self.abs_err if self.amax[k] > 0), default=0.0)

    def to_json(self) -> dict:
        return {"requantized_layers": self.layers, "max_abs_error": max(self.abs_err.values(), default=0.0),
                "max_relative_error": self.max_relative()}


class RequantizedWeights:
    """A source's `RankWeights` with each packed group's FP8 parts requantized to the group's
    scales, exactly as the converter writes them: the reference `verify` compares rank files with."""

    def __init__(self, inner, spec: ModelSpec) -> None:
        self.inner, self.spec = inner, spec
        self.mapping: Mapping = inner.mapping
        self.rank: int = inner.rank
        self.plan = requant_plan(spec, inner.scale)

    def get(self, role: Role, layer: int | None = None, branch: int | None = None) -> torch.Tensor:
        t = self.inner.get(role, layer) if branch is None else self.inner.get(role, layer, branch)
        change = self.plan.get((role, layer, branch))
        return t if change is None else fp8.requantize(t, *change)

    def measure(self) -> RequantError:
        """What the requantization changes in this rank's parts (the whole tensors at tp 1)."""
        err = RequantError()
        for (role, layer, branch), (own, new) in self.plan.items():
            t = self.inner.get(role, layer) if branch is None else self.inner.get(role, layer, branch)
            err.add(layer, t, own, fp8.requantize(t, own, new), new)
        return err

    def scale(self, ref: ScaleRef) -> float:
        if ref.kind in (ScaleKind.K, ScaleKind.V) or not is_fp8(self.spec, TensorRef(ref.role, ref.layer, (),
                                                                                       ref.branch)):
            return self.inner.scale(ref)
        return max(self.inner.scale(r) for r in shared(ref))

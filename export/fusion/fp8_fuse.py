"""FP8 (ModelOpt per-tensor) fusion: one weight scale and one input scale per fused tensor.

A fused gate/up stacks its members' rows and a fused down concatenates their columns, but an FP8
checkpoint holds one `weight_scale` and one `input_scale` per tensor, and each member came with
its own. Two ways to get the fused tensor's (`Requant`, measured in docs/fp8.md):

- `max-scale` (TRT-LLM's rule for q/k/v and gate+fc): each member on its own E4M3 grid, then
  requantized to the group's largest weight scale. Under `--norm fold` a member's folded weight
  is no longer on any grid, so it is first quantized at its own amax / 448 and then requantized:
  two roundings for every member but the largest.
- `refit` (the default): dequantize every member, fuse exactly as in bf16 (fold in fp32), then
  quantize once at the fused tensor's amax / 448. For an unfolded tensor (down; gate/up under
  `--norm last`) both give the same scale (the largest member's, where each member's scale was
  its amax / 448, as ModelOpt writes) and copy a member at that scale bit for bit.

Input scales: down's input is the members' activations side by side, so the max of their input
scales is exactly the amax / 448 of the concatenation on the calibration data. Gate/up's input is
not any member's: member j saw rmsnorm(x) * s_j, the fused block sees rmsnorm(x) times the fused
norm (ones under `fold`), so the members' max is the wrong scale (too small when |s_j| < 1: the
input saturates). `gate_up_input_scale` derives one that never saturates on the calibration data.
A fused gate and up share both scales (the max of theirs), as ModelOpt writes a layer's gate/up.

Every tensor streams in row chunks: a first pass finds each member's amax, a second writes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

import torch

from export import fp8
from export.errors import ExportError
from export.io.reader import CheckpointReader
from export.quantization import FP8_MAX, Quantization
from export.spec import ModelSpec
from export.tensors import LINEAR_ROLES, TensorRef, is_fp8, model_tensors, module_name

Chunks = Iterator[tuple[int, torch.Tensor]]


class Requant(StrEnum):
    REFIT = "refit"  # (b) dequantize, fuse, requantize at the fused amax / 448
    MAX_SCALE = "max-scale"  # (a) each member requantized to the group's largest weight scale


class InputRule(StrEnum):
    DERIVED = "derived"  # a bound that never saturates on the calibration data (the default)
    MEMBERS_MAX = "members-max"  # TRT-LLM's max of the members' input scales (wrong under fold)
    CALIBRATED = "calibrated"  # the fused input's amax measured on text (`fuse --calib`)


@dataclass(frozen=True)
class Member:
    """One member tensor of a fused FP8 linear: its stored E4M3 weight and its two scales."""

    weight: str  # stored name
    weight_scale: float
    input_scale: float
    fold: torch.Tensor | None = None  # fp32 norm scale multiplied into its columns (`--norm fold`)


@dataclass
class FusedScales:
    """What one fused FP8 tensor got, for fuse's output and its fusion record."""

    name: str
    weight_scale: float
    input_scale: float
    rel_error: float  # ||W_written - W_exact|| / ||W_exact|| (L2), W_exact fused in fp32 from the members
    member_weight_scales: list[float] = field(default_factory=list)
    member_input_scales: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# ---- the members' values -------------------------------------------------------------------
def _values(q: torch.Tensor, m: Member) -> torch.Tensor:
    """A member's rows as fp32: dequantized, and folded (exact: E4M3 x bf16 fits fp32)."""
    v = q.float() * m.weight_scale
    return v if m.fold is None else v * m.fold


def _pieces(reader: CheckpointReader, members: list[Member], stacked: bool,
            step: int) -> Iterator[tuple[int, list[tuple[int, torch.Tensor]]]]:
    """(first output row, [(member, E4M3 rows)]): stacked (gate/up) takes one member's rows at a
    time; concatenated (down) takes the same rows of every member, side by side."""
    if stacked:
        offset = 0
        for k, m in enumerate(members):
            sl, rows = reader.get_slice(m.weight), reader.info(m.weight).shape[0]
            for r in range(0, rows, step):
                yield offset + r, [(k, sl[r:r + step])]
            offset += rows
        return
    slices = [reader.get_slice(m.weight) for m in members]
    rows = reader.info(members[0].weight).shape[0]
    for r in range(0, rows, step):
        yield r, [(k, s[r:r + step]) for k, s in enumerate(slices)]


def _own_scales(reader: CheckpointReader, members: list[Member], stacked: bool, step: int) -> list[float]:
    """Pass 1: each member's scale on its own: amax / 448 of its folded values, or (unfolded) its
    stored scale times max|q| / 448, which is the stored scale itself when the member's largest
    value sits at 448, as ModelOpt's amax / 448 puts it."""
    amax = [0.0] * len(members)
    for _, pieces in _pieces(reader, members, stacked, step):
        for k, q in pieces:
            m = members[k]
            a = q.float().abs().max() if m.fold is None else _values(q, m).abs().max()
            amax[k] = max(amax[k], float(a))
    return [m.weight_scale * (a / FP8_MAX) if m.fold is None else fp8.scale_for(a)
            for m, a in zip(members, amax)]


def grid_scales(reader: CheckpointReader, members: list[Member], stacked: bool, step: int,
                requant: Requant) -> list[float]:
    """Pass 1: the grid each member is on before the fused tensor's scale (their max) is applied:
    its own amax / 448 (`refit`), or for `max-scale` its stored scale where it is unfolded."""
    own = _own_scales(reader, members, stacked, step)
    if requant is Requant.MAX_SCALE:  # unfolded members stay on their stored grids
        return [m.weight_scale if m.fold is None else s for m, s in zip(members, own)]
    return own


def fused_fp8(reader: CheckpointReader, name: str, members: list[Member], *, stacked: bool, scale: float,
              input_scale: float, requant: Requant, step: int, report: list[FusedScales]) -> Chunks:
    """The fused tensor's E4M3 row chunks at weight scale `scale` (>= every member's grid scale,
    `grid_scales`); appends its `FusedScales` to `report` once the last chunk is out."""
    grids = grid_scales(reader, members, stacked, step, requant) if requant is Requant.MAX_SCALE else []
    err = ref = 0.0
    for row, pieces in _pieces(reader, members, stacked, step):
        out = []
        for k, q in pieces:
            m, v = members[k], _values(q, members[k])
            if m.fold is None:  # on its stored grid already: exact when that grid is the fused one
                w = fp8.requantize(q, m.weight_scale, scale)
            elif requant is Requant.MAX_SCALE:
                w = fp8.requantize(fp8.quantize(v, grids[k]), grids[k], scale)
            else:
                w = fp8.quantize(v, scale)
            err += float((fp8.dequantize(w, scale) - v).double().pow(2).sum())
            ref += float(v.double().pow(2).sum())
            out.append(w)
        yield row, out[0] if stacked else torch.cat(out, dim=1)
    report.append(FusedScales(name, scale, input_scale, math.sqrt(err / ref) if ref else 0.0,
                              [m.weight_scale for m in members], [m.input_scale for m in members]))


# ---- input scales -----------------------------------------------------------------------------
def down_input_scale(members: list[Member]) -> float:
    """Exact: the fused input is the members' activations concatenated, whose amax is the max of
    theirs."""
    return max(m.input_scale for m in members)


def gate_up_input_scale(members: list[Member], norms: list[torch.Tensor], same_input: list[int],
                        fused_norm: torch.Tensor | None, hidden: int, rule: InputRule,
                        amax: float | None = None) -> float:
    """The fused gate/up's input scale. Its input is u * n, u = rmsnorm(x) (unit scale) and n the
    fused norm (`fused_norm`; None: ones, `--norm fold`). Member j (its norm `norms[j]`) was
    calibrated on u_j * s_j, so amax(u_j) <= 448 * input_scale_j / min|s_j|; and every token of u
    has mean square < 1, so |u| < sqrt(hidden) always. For the members in `same_input` (whose u_j
    is the fused block's u: a fuse group's first member, every branch of a parallel layer) both
    bounds hold for u, and `DERIVED` takes the tighter, times max|n|: a scale that never saturates
    on the calibration data. `MEMBERS_MAX` is TRT-LLM's max of the members' input scales;
    `CALIBRATED` is `amax` / 448, `amax` measured on the fused input (`fusion.calib`)."""
    if rule is InputRule.CALIBRATED:
        if amax is None:
            raise ValueError("a calibrated input scale needs the measured amax")
        return fp8.scale_for(amax)
    if rule is InputRule.MEMBERS_MAX:
        return max(m.input_scale for m in members)
    bound = math.sqrt(hidden)
    for j in same_input:
        smallest = float(norms[j].float().abs().min())
        if smallest > 0:
            bound = min(bound, FP8_MAX * members[j].input_scale / smallest)
    top = 1.0 if fused_norm is None else float(fused_norm.float().abs().max())
    return fp8.scale_for(bound * top)


def summary(report: list[FusedScales]) -> str:
    """One line for fuse's output."""
    worst = max(report, key=lambda r: r.rel_error)
    return (f"{len(report)} fused FP8 tensor(s) requantized; relative error (L2) of the weights: max "
            f"{worst.rel_error:.2e} ({worst.name}), mean {sum(r.rel_error for r in report) / len(report):.2e}")


# ---- exclude_modules after renumbering -----------------------------------------------------------
LAYER_INDEX = re.compile(r"(?<=layers\.)(\d+)(?=\.|$)")


def remap_exclude(spec: ModelSpec, new: ModelSpec, layer_map: dict[int, int | None], fused: set[int],
                  members_of: Callable[[TensorRef], list[TensorRef]]) -> ModelSpec:
    """`new` with the source's quantization, its `exclude_modules` patterns renumbered: a literal
    `layers.N` becomes the layer's new index. Refused, naming the pattern: one that names a layer
    the plan fuses (`fused`) and excludes something there (a fused FFN is one tensor: FP8 or not),
    and any pattern set that, renumbered, would change which linears are FP8 (a wildcard over
    layer indices); `members_of(ref)` gives the source tensors a new tensor is made of."""
    quant = spec.quant
    patterns = []
    for p in quant.exclude:
        hit = LAYER_INDEX.search(p)
        if hit is None:
            patterns.append(p)
            continue
        old = int(hit.group(1))
        if old in fused:
            if any(_matches(p, r) for r in model_tensors(spec) if r.layer == old and r.role in LINEAR_ROLES):
                raise ExportError(f"exclude_modules pattern {p!r} names layer {old}, which the plan fuses: a fused FFN "
                                  f"is one FP8 tensor, so its members cannot be excluded one by one; quantize them "
                                  f"alike (or leave layer {old} out of the plan)")
            continue  # it excluded nothing there: dropped
        patterns.append(LAYER_INDEX.sub(str(layer_map[old]), p, count=1))
    out = new.with_quant(replace(quant, exclude=tuple(patterns)))
    for ref in model_tensors(out):
        if ref.role not in LINEAR_ROLES or ref.alias is not None:
            continue
        want = {is_fp8(spec, r) for r in members_of(ref)}
        if len(want) > 1:
            raise ExportError(f"{module_name(ref)}: its members are FP8 and unquantized by exclude_modules "
                              f"{list(quant.exclude)}: a fused tensor is one dtype; quantize them alike")
        if want and is_fp8(out, ref) not in want:
            raise ExportError(f"exclude_modules {list(quant.exclude)}: renumbered to {patterns}, they would "
                              f"{'exclude' if want == {True} else 'no longer exclude'} {module_name(ref)}; name "
                              f"layers by literal index (a wildcard over layer indices cannot be renumbered)")
    return out


def _matches(pattern: str, ref: TensorRef) -> bool:
    return Quantization(exclude=(pattern,)).excludes(module_name(ref))

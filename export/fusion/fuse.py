"""Write a fused checkpoint: each plan group becomes one attention-free block with one wide FFN.

Theorem 3.1 of the paper: sum_j FFN_j(x) = FFN*(x) with gate/up stacked along the intermediate
dimension (dim 0 in nn.Linear layout) and down concatenated along its input dimension (dim 1).
The fused block therefore computes the *parallel* form x + sum_j FFN_j(norm(x)) of its group.

Norms (each member had its own post-attention RMSNorm scale s_j):
- `fold` (default): s_j is multiplied into member j's gate and up columns and the fused block gets
  a unit-scale norm. Since RMSNorm is rms(x)^-1 * x * s and the 1/rms factor is shared by all
  members, this is x + sum_j FFN_j(norm_j(x)) in exact arithmetic. The product is computed in fp32
  and stored in the output dtype: in bf16 each folded weight is rounded once (about 8e-4 relative, L2,
  on the demo's FFN output); `dtype="float32"` stores it unrounded (a bf16 x bf16 product is exact
  in fp32).
- `last`: the paper's eq. 5, the last member's norm for all, weights untouched.

Every tensor streams through in row chunks (read a slice, transform, write it at its offset,
drop it), so a fused FFN larger than memory is fine. Output is atomic; the new config comes from
`ModelSpec.with_layers(...).to_hf_config()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import torch

from export.errors import ExportError
from export.fusion.card import write_fused_card
from export.fusion.fp8_fuse import (
    FusedScales,
    InputRule,
    Member,
    Requant,
    down_input_scale,
    fused_fp8,
    gate_up_input_scale,
    grid_scales,
    remap_exclude,
    summary,
)
from export.fusion.plan import FusionPlan, Group
from export.hf_code import install_remote_code
from export.io.output import check_output, output_dir
from export.io.paths import checkpoint_file
from export.io.reader import CheckpointReader
from export.io.safetensors_format import torch_dtype
from export.io.writer import HFCheckpointWriter, copy_sidecars, sidecar_files, write_config, write_quant_config
from export.progress import byte_progress
from export.spec import FFN, Attention, AttentionKind, FFNKind, Layer, ModelSpec, ffn_mult_for
from export.tensors import (
    HF_NAMES,
    Role,
    ScaleKind,
    ScaleRef,
    TensorRef,
    is_fp8,
    model_tensors,
    scale_refs,
    stored_dtype,
)

CHUNK_BYTES = 64 << 20  # bytes per streamed row chunk
FUSION_RECORD = "fusion_plan.json"
EMPTY = Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.NOOP))

Chunks = Iterator[tuple[int, torch.Tensor]]  # (first row, rows)


class NormMode(StrEnum):
    FOLD = "fold"
    LAST = "last"


class FusedForm(StrEnum):
    """How a fused group is written (docs/fusion.md, "two representations").

    WIDE: one wide FFN (Theorem 3.1: gate/up stacked, down concatenated), what the released
    Ultra config and TRT-LLM's nemotron_nas run. PARALLEL: Puzzletron's `parallel_blocks`, one
    layer whose branches are the members' FFN blocks, unchanged (no concatenation, no folding),
    run in parallel on one input and summed: the same function, exactly, in the source's weights.
    """

    WIDE = "wide-ffn"
    PARALLEL = "parallel-blocks"


@dataclass(frozen=True)
class FuseResult:
    out: Path
    before: ModelSpec
    after: ModelSpec
    groups: list[Group]
    layer_map: dict[int, int | None]  # old layer -> new layer (None: fused away or dropped)
    bytes_written: int
    seconds: float
    fp8: list[FusedScales] = field(default_factory=list)  # each fused FP8 tensor's scales and error


# ---- the new layer list ------------------------------------------------------------------
def fused_layer(spec: ModelSpec, group: Group, form: FusedForm = FusedForm.WIDE) -> Layer:
    """Attention no-op plus one FFN of the summed width (its config says an ffn_mult that gives
    exactly that width, or the width itself where no ffn_mult can); or, as `parallel-blocks`, a
    parallel layer whose branches are the members' own attention-free FFN blocks."""
    if form is FusedForm.PARALLEL:
        return Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.NOOP),
                     tuple(spec.layers[i] for i in group.ffn_layers))
    width = group.fused_width
    gated = spec.layers[group.ffn_layers[0]].ffn.gated  # a plain MLP group fuses into a plain MLP
    return Layer(Attention(AttentionKind.NOOP),
                 FFN(FFNKind.SWIGLU, width, ffn_mult_for(width, spec.hidden), gated=gated))


def fused_layout(spec: ModelSpec, groups: list[Group], keep_layer_count: bool = False,
                 form: FusedForm = FusedForm.WIDE) -> tuple[list[Layer], list[int | Group | None]]:
    """(new layers, where each comes from: an old layer index, a group, or None for an empty block).

    A group's fused block sits at the group's first index; the rest of its range is dropped, or
    kept as empty blocks (as the released Ultra config does) with `keep_layer_count`.
    """
    owner = {i: g for g in groups for i in range(g.first, g.last + 1)}
    layers: list[Layer] = []
    sources: list[int | Group | None] = []
    for i, lay in enumerate(spec.layers):
        g = owner.get(i)
        if g is None:
            layers.append(lay)
            sources.append(i)
        elif i == g.first:
            layers.append(fused_layer(spec, g, form))
            sources.append(g)
        elif keep_layer_count:
            layers.append(EMPTY)
            sources.append(None)
    return layers, sources


def layer_map(spec: ModelSpec, sources: list[int | Group | None]) -> dict[int, int | None]:
    m: dict[int, int | None] = dict.fromkeys(range(spec.num_layers))
    for new, src in enumerate(sources):
        if isinstance(src, int):
            m[src] = new
        elif isinstance(src, Group):
            m[src.first] = new
    return m


# ---- streamed producers ------------------------------------------------------------------
def _rows_per_chunk(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    row = dtype.itemsize
    for d in shape[1:]:
        row *= d
    return max(1, CHUNK_BYTES // row)


def _rows(reader: CheckpointReader, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Chunks:
    """Row chunks in the source's dtype (so a fold multiplies the source values, rounding once)."""
    sl, step = reader.get_slice(name), _rows_per_chunk(shape, dtype)
    for r in range(0, shape[0], step):
        yield r, sl[r:r + step]


def _copy(reader: CheckpointReader, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Chunks:
    for r, rows in _rows(reader, name, shape, dtype):
        yield r, rows.to(dtype)


def _stacked(reader: CheckpointReader, role: Role, group: Group, norm: NormMode, dtype: torch.dtype) -> Chunks:
    """Gate or up: members' rows one after another, each scaled by its own norm under `fold`."""
    offset = 0
    for layer in group.ffn_layers:
        name = HF_NAMES[role].format(l=layer)
        shape = reader.info(name).shape
        scale = reader.get(HF_NAMES[Role.FFN_NORM].format(l=layer)).float() if norm is NormMode.FOLD else None
        for r, rows in _rows(reader, name, shape, dtype):
            yield offset + r, (rows if scale is None else rows.float() * scale).to(dtype)
        offset += shape[0]


def _concat(reader: CheckpointReader, group: Group, hidden: int, dtype: torch.dtype) -> Chunks:
    """Down: each output row is the members' rows side by side (dim 1), read as row slices."""
    slices = [reader.get_slice(HF_NAMES[Role.DOWN].format(l=layer)) for layer in group.ffn_layers]
    step = _rows_per_chunk((hidden, group.fused_width), dtype)
    for r in range(0, hidden, step):
        yield r, torch.cat([s[r:r + step] for s in slices], dim=1).to(dtype)


def _norm(reader: CheckpointReader, group: Group, norm: NormMode, hidden: int, dtype: torch.dtype) -> Chunks:
    if norm is NormMode.FOLD:
        yield 0, torch.ones(hidden, dtype=dtype)
    else:
        yield from _copy(reader, HF_NAMES[Role.FFN_NORM].format(l=group.ffn_layers[-1]), (hidden,), dtype)


def _fused_roles(spec: ModelSpec, layer: int, role: Role,
                 members: Callable[[Role], list[TensorRef]]) -> dict[Role, list[TensorRef]]:
    """The member tensors of `role`'s fused tensor, and of its partner that shares its scales
    (gate with up, where both are FP8; down alone); a plain MLP member has no gate."""
    roles = (Role.DOWN,) if role is Role.DOWN else (Role.GATE, Role.UP) if spec.layers[layer].ffn.gated else (Role.UP,)
    return {r: members(r) for r in roles if r is role or is_fp8(spec, members(r)[0])}


# ---- FP8 sources: one weight scale and one input scale per fused tensor (fusion/fp8_fuse.py) ----
@dataclass
class FP8Job:
    """How one run's fused FP8 tensors get their scales, and what they got."""

    requant: Requant = Requant.REFIT
    input_rule: InputRule = InputRule.DERIVED
    amax: dict[int, float] = field(default_factory=dict)  # `--calib`: group's first FFN layer -> fused input amax
    report: list[FusedScales] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)  # computed scale tensors, by name
    shared: dict[object, tuple[float, float]] = field(default_factory=dict)  # fused gate+up -> their scales

    def fused(self, reader: CheckpointReader, out: TensorRef, members: dict[Role, list[TensorRef]],
              norms: list[str], fold: bool, same_input: list[int], fused_norm: torch.Tensor | None, hidden: int,
              amax: float | None = None) -> Chunks:
        """Rows of the fused FP8 tensor `out` from its FP8 members (`members[out.role]`, each with
        its FFN norm `norms[k]`, folded into gate/up under `fold`); records the two scales it gets.
        A fused gate and up share both (the max of theirs), as ModelOpt writes a layer's gate/up
        (docs/fp8.md), so a loader fuses them without requantizing: `members` holds both."""
        step = _rows_per_chunk(out.shape, torch.float32)
        stacked = out.role is not Role.DOWN
        ms = {role: self._members(reader, refs, norms, fold and role is not Role.DOWN)
              for role, refs in members.items()}
        if not stacked:
            scale = max(grid_scales(reader, ms[out.role], False, step, self.requant))
            in_scale = down_input_scale(ms[out.role])
        else:
            key = (out.layer, out.branch)
            if key not in self.shared:
                scale = max(max(grid_scales(reader, m, True, step, self.requant)) for m in ms.values())
                in_scale = max(gate_up_input_scale(m, [reader.get(n) for n in norms], same_input, fused_norm, hidden,
                                                   self.input_rule, amax) for m in ms.values())
                self.shared[key] = (scale, in_scale)
            scale, in_scale = self.shared[key]
        self.scales[_scale(ScaleKind.INPUT, out).name] = in_scale
        self.scales[_scale(ScaleKind.WEIGHT, out).name] = scale
        yield from fused_fp8(reader, out.hf_name, ms[out.role], stacked=stacked, scale=scale, input_scale=in_scale,
                             requant=self.requant, step=step, report=self.report)

    @staticmethod
    def _members(reader: CheckpointReader, refs: list[TensorRef], norms: list[str], fold: bool) -> list[Member]:
        return [Member(m.hf_name, reader.scale(_scale(ScaleKind.WEIGHT, m)), reader.scale(_scale(ScaleKind.INPUT, m)),
                       reader.get(n).float() if fold else None) for m, n in zip(refs, norms)]

    def scale_value(self, reader: CheckpointReader, ref: ScaleRef, source: ScaleRef | None) -> torch.Tensor:
        """A scale tensor of the output: computed here, or the source's `source`, as float32."""
        value = self.scales[ref.name] if source is None else reader.scale(source)
        return torch.tensor(value, dtype=torch.float32)


def _scale(kind: ScaleKind, ref: TensorRef) -> ScaleRef:
    return ScaleRef(kind, ref.role, ref.layer, ref.branch)


def _write_scales(writer: HFCheckpointWriter, reader: CheckpointReader, spec: ModelSpec, job: FP8Job,
                  source_of: Callable[[ScaleRef], ScaleRef | None]) -> None:
    for s in scale_refs(spec):
        writer.write(s.name, job.scale_value(reader, s, source_of(s)))


def _plan(spec: ModelSpec, refs: list[TensorRef]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The writer's entries: every tensor in its stored dtype (FP8 linears float8_e4m3fn), then
    every scale (float32 scalars, as ModelOpt writes them)."""
    plan = [(r.hf_name, torch_dtype(stored_dtype(spec, r)), r.shape) for r in refs]
    return plan + [(s.name, torch.float32, ()) for s in scale_refs(spec)]


def _group_scale_source(sources: list[int | Group | None]) -> Callable[[ScaleRef], ScaleRef | None]:
    """Where a fused checkpoint's scale comes from: the same scale of the source layer it copies
    (a parallel-blocks branch k: member k's), or None where `FP8Job` computed it (a wide FFN)."""
    def source_of(s: ScaleRef) -> ScaleRef | None:
        src = sources[s.layer] if s.layer is not None else None
        if s.layer is None:
            return s
        if isinstance(src, int):
            return replace(s, layer=src)
        assert isinstance(src, Group), s
        return ScaleRef(s.kind, s.role, src.ffn_layers[s.branch]) if s.branch is not None else None
    return source_of


def _producer(reader: CheckpointReader, ref: TensorRef, src: int | Group | None, spec: ModelSpec,
              norm: NormMode, dtype: torch.dtype, job: FP8Job | None = None) -> Chunks:
    """Where the rows of one output tensor come from (`job`: this tensor is FP8)."""
    if isinstance(src, Group) and ref.branch is not None:  # parallel-blocks form: branch k is member k, as is
        member = TensorRef(ref.role, src.ffn_layers[ref.branch], ref.shape)
        return _copy(reader, member.hf_name, ref.shape, dtype)
    if isinstance(src, Group) and job is not None and ref.role is not Role.FFN_NORM:
        norms = [HF_NAMES[Role.FFN_NORM].format(l=j) for j in src.ffn_layers]
        last = None if norm is NormMode.FOLD else reader.get(norms[-1])
        return job.fused(reader, ref, _fused_roles(spec, src.ffn_layers[0], ref.role,
                                                   lambda r: [TensorRef(r, j, ()) for j in src.ffn_layers]),
                         norms, norm is NormMode.FOLD, [0], last, spec.hidden, job.amax.get(src.ffn_layers[0]))
    if isinstance(src, Group):
        fused: dict[Role, Callable[[], Chunks]] = {
            Role.FFN_NORM: lambda: _norm(reader, src, norm, spec.hidden, dtype),
            Role.GATE: lambda: _stacked(reader, Role.GATE, src, norm, dtype),
            Role.UP: lambda: _stacked(reader, Role.UP, src, norm, dtype),
            Role.DOWN: lambda: _concat(reader, src, spec.hidden, dtype),
        }
        return fused[ref.role]()
    name = ref.at(src).hf_name if ref.layer is not None else ref.hf_name
    return _copy(reader, name, ref.shape, dtype)


# ---- parallel_blocks layers as wide FFNs (what `convert` hands TRT-LLM) ----------------------
def _branch_name(role: Role, layer: int, branch: int) -> str:
    return TensorRef(role, layer, (), branch).hf_name


def _branch_rows(reader: CheckpointReader, role: Role, layer: int, branches: list[int],
                 dtype: torch.dtype) -> Chunks:
    """Gate or up of the wide FFN: each branch's rows, scaled by that branch's own norm (fold)."""
    offset = 0
    for k in branches:
        name = _branch_name(role, layer, k)
        shape = reader.info(name).shape
        scale = reader.get(_branch_name(Role.FFN_NORM, layer, k)).float()
        for r, rows in _rows(reader, name, shape, dtype):
            yield offset + r, (rows.float() * scale).to(dtype)
        offset += shape[0]


def _branch_down(reader: CheckpointReader, layer: int, branches: list[int], hidden: int, width: int,
                 dtype: torch.dtype) -> Chunks:
    slices = [reader.get_slice(_branch_name(Role.DOWN, layer, k)) for k in branches]
    step = _rows_per_chunk((hidden, width), dtype)
    for r in range(0, hidden, step):
        yield r, torch.cat([s[r:r + step] for s in slices], dim=1).to(dtype)


def _widened(spec: ModelSpec, layer: int | None) -> list[int] | None:
    """The FFN branches of a layer `widen_parallel_checkpoint` writes as one wide FFN, else None."""
    lay = spec.layers[layer] if layer is not None else None
    if lay is None or not lay.is_parallel or lay.has_attention:
        return None
    return [k for k, b in enumerate(lay.branches) if b.has_ffn]


def _widened_chunks(reader: CheckpointReader, spec: ModelSpec, ref: TensorRef, dtype: torch.dtype,
                    job: FP8Job | None = None) -> Chunks:
    """Where the rows of one tensor of the widened checkpoint come from (`job`: it is FP8)."""
    branches = _widened(spec, ref.layer)
    if branches is None:
        return _copy(reader, ref.hf_name, ref.shape, dtype)
    if ref.role is Role.FFN_NORM:
        return iter([(0, torch.ones(spec.hidden, dtype=dtype))])
    if job is not None:  # every branch sees the same input, so every branch's input scale bounds it
        assert ref.layer is not None
        layer = ref.layer
        present = {t.role for t in model_tensors(spec) if t.layer == layer and is_fp8(spec, t)}
        members = {r: [TensorRef(r, layer, (), k) for k in branches]
                   for r in ((Role.GATE, Role.UP) if ref.role is not Role.DOWN else (Role.DOWN,)) if r in present}
        norms = [_branch_name(Role.FFN_NORM, layer, k) for k in branches]
        return job.fused(reader, ref, members, norms, True, list(range(len(branches))), None, spec.hidden)
    if ref.role in (Role.GATE, Role.UP):
        return _branch_rows(reader, ref.role, ref.layer, branches, dtype)
    assert ref.role is Role.DOWN, ref
    return _branch_down(reader, ref.layer, branches, spec.hidden, ref.shape[1], dtype)


def widen_parallel_checkpoint(source: Path, out: Path, *, dtype: str = "float32",
                              follow_symlinks: bool | None = None,
                              requant: Requant | str = Requant.REFIT) -> ModelSpec:
    """Write `source` with every attention-free parallel_blocks layer as one wide FFN to `out`
    (a scratch directory `convert` makes and removes): gate/up stacked with each branch's norm
    folded in fp32 (stored in `dtype`, float32 by default: unrounded), down concatenated, a unit
    norm. Exactly sum_k branch_k(x) - (n-1) x; returns the widened description. An FP8 source's
    wide FFN is FP8, with one weight and input scale per tensor as `fuse` gives them (`requant`);
    its other FP8 linears and scales are copied as they are."""
    spec = ModelSpec.load(source)
    reader = CheckpointReader(source, follow_symlinks=follow_symlinks)
    reader.validate(spec)
    wide = spec.widened().with_dtype(dtype)
    if not spec.quant.is_none:
        wide = remap_exclude(spec, wide, {i: i for i in range(spec.num_layers)}, set(), _branches_of(spec))
    job = FP8Job(Requant(requant))
    refs = model_tensors(wide)
    out.mkdir(parents=True)
    writer = HFCheckpointWriter(out, _plan(wide, refs), 5 << 30)
    for ref in refs:
        tdtype = torch_dtype(stored_dtype(wide, ref))
        for row, chunk in _widened_chunks(reader, spec, ref, tdtype, job if is_fp8(wide, ref) else None):
            writer.write_rows(ref.hf_name, row, chunk)
    _write_scales(writer, reader, wide, job, lambda s: None if _widened(spec, s.layer) is not None else s)
    writer.close()
    copy_sidecars(source, out, names=sidecar_files(source, follow_symlinks=follow_symlinks))
    write_config(out, wide.to_hf_config())
    write_quant_config(out, wide.quant)
    reader.close()
    return wide


def _branches_of(spec: ModelSpec) -> Callable[[TensorRef], list[TensorRef]]:
    """The source tensors a widened checkpoint's tensor is made of: a wide FFN's, its branches'."""
    def members(ref: TensorRef) -> list[TensorRef]:
        branches = _widened(spec, ref.layer)
        if branches is None:
            return [ref]
        return [TensorRef(ref.role, ref.layer, (), k) for k in branches]
    return members


# ---- the command ---------------------------------------------------------------------------
def fuse_checkpoint(source: str | Path, plan: FusionPlan, out: str | Path, *, norm: NormMode | str = NormMode.FOLD,
                    keep_layer_count: bool = False, max_shard_bytes: int = 5 << 30,
                    progress: bool = True, dtype: str | None = None, overwrite: bool = False,
                    inputs: Iterable[str | Path] = (), follow_symlinks: bool | None = None,
                    form: FusedForm | str = FusedForm.WIDE, requant: Requant | str = Requant.REFIT,
                    input_rule: InputRule | str = InputRule.DERIVED,
                    input_amax: dict[int, float] | None = None) -> FuseResult:
    """Write the fused HF DeciLM checkpoint of `source` under `plan` to `out` (atomically).

    `dtype` (default: the source's) is the output's; every tensor is cast as it streams through.
    `out` must be new, or a previous output replaced with `overwrite`; it may not overlap `source`
    nor the further `inputs` (the plan file). Everything that can refuse the job (config, weight
    headers, side files and their links, the tokenizer) is checked before the output exists;
    `follow_symlinks` as in `export.io.paths`. `form` as in `FusedForm`: `parallel-blocks` keeps
    every member's norm in its branch (`norm` does not apply) and needs a Puzzletron-schema source,
    since the released DeciLM code has no parallel blocks.

    An FP8 (ModelOpt) source gives an FP8 output: copied linears keep their E4M3 bytes and scales,
    each fused one gets one weight and one input scale (`requant`, `input_rule`: fusion/fp8_fuse.py;
    `input_amax`, from `fusion.calib.fused_input_amax`, makes the gate/up input scales calibrated),
    and `exclude_modules` is renumbered with the layers.
    """
    t0 = time.perf_counter()
    norm, form = NormMode(norm), FusedForm(form)
    if form is FusedForm.PARALLEL and norm is NormMode.LAST:
        raise ExportError("--norm last rewrites the group's norms for one wide FFN; --as parallel-blocks keeps "
                          "each member's own norm in its branch (exact), so the two do not combine")
    source = Path(source)
    inputs = [source, *inputs]
    check_output(out, inputs=inputs, overwrite=overwrite)
    checkpoint_file(source, "config.json", follow_symlinks=follow_symlinks)
    spec = ModelSpec.load(source)
    reader = CheckpointReader(source, follow_symlinks=follow_symlinks)
    reader.validate(spec)
    sidecars = sidecar_files(source, follow_symlinks=follow_symlinks)
    groups = plan.resolve(spec)
    if not groups:
        raise ExportError(f"{source}: the plan has no groups: nothing to fuse, nothing written")
    if form is FusedForm.PARALLEL and spec.block_schema.name != "puzzletron":
        raise ExportError(f"{source}: --as parallel-blocks writes Puzzletron's `parallel_blocks`, which this "
                          f"source's schema ({spec.block_schema.name}: its DeciLM code has no parallel blocks) "
                          f"cannot load; use --as wide-ffn")
    layers, sources = fused_layout(spec, groups, keep_layer_count, form)
    mapping = layer_map(spec, sources)
    new_spec = spec.with_layers(layers).with_dtype(dtype or spec.dtype)
    if not spec.quant.is_none:
        fused = {i for g in groups for i in range(g.first, g.last + 1)}
        new_spec = remap_exclude(spec, new_spec, mapping, fused, _members_of(sources))
    job = FP8Job(Requant(requant), InputRule.CALIBRATED if input_amax else InputRule(input_rule), input_amax or {})
    refs = model_tensors(new_spec)
    entries = _plan(new_spec, refs)
    planned = sum(r.numel() * torch_dtype(stored_dtype(new_spec, r)).itemsize for r in refs)
    with output_dir(out, inputs=inputs, overwrite=overwrite, planned_bytes=planned) as tmp:
        writer = HFCheckpointWriter(tmp, entries, max_shard_bytes)
        bar = byte_progress(writer.total_bytes, "fuse", enabled=progress)
        for ref in refs:
            src = sources[ref.layer] if ref.layer is not None else None
            fp8_job = job if is_fp8(new_spec, ref) else None
            tdtype = torch_dtype(stored_dtype(new_spec, ref))
            for row, chunk in _producer(reader, ref, src, spec, norm, tdtype, fp8_job):
                bar.update(writer.write_rows(ref.hf_name, row, chunk))
        _write_scales(writer, reader, new_spec, job, _group_scale_source(sources))
        bar.close()
        writer.close()
        copy_sidecars(source, tmp, names=sidecars)
        write_quant_config(tmp, new_spec.quant)  # renumbered exclude_modules (over the copied one)
        write_fused_card(tmp, source, spec, new_spec, groups,
                         norm.value if form is FusedForm.WIDE else "per branch (parallel-blocks)", _fp8_note(job))
        write_config(tmp, new_spec.to_hf_config())
        install_remote_code(tmp)  # loads in transformers; a source's own auto_map and code are kept
        _write_record(tmp, source, plan, groups, norm, keep_layer_count, mapping, form, new_spec, job)
        _check_written(tmp, new_spec)
    reader.close()
    return FuseResult(Path(out), spec, new_spec, groups, mapping, writer.total_bytes, time.perf_counter() - t0,
                      job.report)


def _fp8_note(job: FP8Job) -> str | None:
    if not job.report:
        return None
    return (f"Each fused FP8 tensor has one weight and one input scale (`--fp8-requant {job.requant.value}`, "
            f"gate/up input scales {job.input_rule.value}): {summary(job.report)}; per tensor in `fusion_plan.json`.")


def _members_of(sources: list[int | Group | None]) -> Callable[[TensorRef], list[TensorRef]]:
    """The source tensors one output tensor is made of (for the exclude_modules check)."""
    def members(ref: TensorRef) -> list[TensorRef]:
        src = sources[ref.layer] if ref.layer is not None else None
        if ref.layer is None:
            return [ref]
        if isinstance(src, int):
            return [ref.at(src)]
        assert isinstance(src, Group), ref
        if ref.branch is not None:
            return [TensorRef(ref.role, src.ffn_layers[ref.branch], ref.shape)]
        return [TensorRef(ref.role, j, ()) for j in src.ffn_layers]
    return members


def _check_written(path: Path, expected: ModelSpec) -> None:
    """Re-read what was written: the config's ffn_mults must give exactly the fused widths."""
    written = ModelSpec.load(path)
    for i, (a, b) in enumerate(zip(written.layers, expected.layers)):
        if a != b:
            raise ExportError(f"layer {i}: config.json describes {a.short()}, expected {b.short()}")
    CheckpointReader(path).validate(written)


def _write_record(path: Path, source: Path, plan: FusionPlan, groups: list[Group], norm: NormMode,
                  keep_layer_count: bool, mapping: dict[int, int | None],
                  form: FusedForm = FusedForm.WIDE, spec: ModelSpec | None = None, job: FP8Job | None = None) -> None:
    """What was fused and how, so later stages (manifest, evaluate) need not guess."""
    record = {"source": str(source.resolve()), "norm": norm.value, "form": form.value,
              "keep_layer_count": keep_layer_count,
              "plan": plan.to_json(),
              "groups": [{"group": [g.first, g.last], "ffn_layers": list(g.ffn_layers),
                          "widths": list(g.widths), "fused_width": g.fused_width} for g in groups],
              "layer_map": {str(k): v for k, v in mapping.items()}}
    if spec is not None and job is not None and spec.quant.fp8:
        record["fp8"] = {"requant": job.requant.value, "input_scales": job.input_rule.value,
                         "exclude_modules": list(spec.quant.exclude),
                         "tensors": [r.to_json() for r in job.report]}
    (path / FUSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")

"""HF checkpoint -> TRT-LLM checkpoint in one streaming pass, all ranks written by one process.

Every rank file's header is planned up front (`plan`), then each source tensor is read once, in
file order and in row windows of at most 64 MiB, each window cut into its pieces for every rank
(`export.sharding` via the plan) and each piece written at its final rows; q, k and v land in their
row ranges of the rank's qkv. Peak memory is a couple of windows, whatever the model or tensor size
(Ultra's widest fused FFN matrix alone is 14 GB). Everything is checked before the first byte is
written, and the output appears atomically with its manifest.

An FP8 (ModelOpt) source converts the same way: FP8 weights stream as float8_e4m3fn bytes (q, k and
v requantized to their qkv's shared scale when their scales differ, `packed_scales`), and each
rank file also gets the per-tensor scales its plan names (`RankPlan.scales`), identical on every
rank. Quantizing a bf16 source is `python -m export quantize`'s job, not this one's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from export.engine_dir import EngineDir
from export.errors import ConfigError, ExportError
from export.io.output import check_output, output_dir
from export.io.paths import check_tree, checkpoint_file
from export.io.raw_tensors import RawTensors
from export.io.reader import CheckpointReader
from export.io.safetensors_format import SafetensorsWriter, torch_dtype
from export.io.tokenizer_file import TOKENIZER_JSON, check_tokenizer_json
from export.layout import require_layout
from export.manifest import DEFAULT_BUILD, Manifest, tree_sha256
from export.mapping import Mapping
from export.progress import byte_progress
from export.quantization import FP8_MAX
from export.sharding import take
from export.spec import TRTLLM_STAGE, ModelSpec, normalize_dtype
from export.trtllm.config import read_trtllm_config, write_trtllm_config
from export.trtllm.packed_scales import RequantError, requant_plan, scale_value
from export.trtllm.rank_files import rank_file
from export.trtllm.rank_layout import (
    Placement,
    RankPlan,
    check_complete,
    plan_checkpoint,
    quant_layout_problems,
    window,
)

log = logging.getLogger(__name__)

# Files that make up a tokenizer (copied to engines/NAME/tokenizer/); the first group must be present.
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = (*TOKENIZER_CORE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json")
FUSION_PLAN = "fusion_plan.json"  # written by `fuse` beside the fused checkpoint
WINDOW_BYTES = 64 << 20  # source rows read at a time: bounds memory whatever the largest tensor
FP8_DTYPE_NAMES = ("fp8", "float8", "float8_e4m3fn", "e4m3")  # refused as a target: see refuse_quantizing


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    manifest: Manifest
    bytes_read: int
    bytes_written: int
    seconds: float
    requant: RequantError | None = None  # FP8 sources: what q/k/v requantization changed (empty: exact)


@dataclass(frozen=True)
class Prepared:
    """What `prepare` checked and `convert` writes from."""

    spec: ModelSpec
    mapping: Mapping
    dtype: str
    reader: CheckpointReader
    plans: list[RankPlan]
    tokenizer: list[str]  # tokenizer files to copy (empty: the source has none)


def prepare(source: Path, tp: int, pp: int, dtype: str | None, *, follow_symlinks: bool | None = None,
            embedding_shard: int | None = None) -> Prepared:
    """Everything that can refuse the job, before any output exists: the config, every weight file's
    header, the files the source names (inside it), and the tokenizer that will be copied."""
    check_tree(source, follow_symlinks=follow_symlinks)  # config.json included; the manifest hashes every file
    spec = ModelSpec.load(source)
    refuse_quantizing(dtype, spec, source)
    mapping = Mapping(tp, pp, embedding_shard=embedding_shard)
    require_layout(spec, mapping, trtllm=True)
    problems = quant_layout_problems(spec, mapping)
    if problems:
        raise ExportError(f"{source}: cannot write this FP8 checkpoint at tp={tp} pp={pp}: " + "; ".join(problems))
    reader = CheckpointReader(source, follow_symlinks=follow_symlinks)
    reader.validate(spec)
    plans = plan_checkpoint(spec, mapping)
    problems = check_complete(spec, mapping, plans)
    if problems:  # a bug in the tables, not in the input
        raise AssertionError("incomplete TRT-LLM plan:\n  - " + "\n  - ".join(problems))
    tokenizer = tokenizer_files(source, follow_symlinks=follow_symlinks)
    return Prepared(spec, mapping, normalize_dtype(dtype or spec.dtype), reader, plans, tokenizer)


def refuse_quantizing(dtype: str | None, spec: ModelSpec, source: Path) -> None:
    """`--dtype fp8` asks convert to quantize, which it does not do (calibration belongs to
    `quantize`); an FP8 source keeps its FP8 linears whatever `--dtype` says of the rest."""
    if dtype is not None and dtype.lower() in FP8_DTYPE_NAMES:
        have = " (it already is FP8: drop --dtype)" if spec.quant.fp8 else ""
        raise ConfigError(f"{source}: convert does not quantize{have}; make an FP8 checkpoint with "
                          f"`python -m export quantize {source} --out DIR --calib TEXT`, then convert DIR")


def convert(source: Path, out: Path, *, tp: int, pp: int = 1, dtype: str | None = None,
            progress: bool = True, window_bytes: int = WINDOW_BYTES, overwrite: bool = False,
            follow_symlinks: bool | None = None, embedding_shard: int | None = None,
            recorded_source: Path | None = None) -> ConvertResult:
    """Write `out/` = checkpoint/ (config.json + rank{r}.safetensors), tokenizer/, manifest.json.

    `recorded_source` is what the manifest names as the source when `source` is an intermediate
    (the widened scratch copy of a parallel-blocks checkpoint): it is hashed and recorded instead.

    `out` must be new, or a previous output replaced with `overwrite` (`export.io.output`).
    `follow_symlinks` lets links in the source lead outside it (default: only into it, or into the
    hub cache's blobs/; see `export.io.paths`). `embedding_shard` 0 or 1 splits the embedding across
    the tp ranks (TRT-LLM's `use_parallel_embedding` with that `embedding_sharding_dim`) instead of
    repeating it.
    """
    source = Path(source)
    check_output(out, inputs=[source], overwrite=overwrite)
    spec = ModelSpec.load(source)
    refuse_quantizing(dtype, spec, source)
    if spec.parallel_layers() and not spec.quant.is_none:
        raise ExportError(f"{source}: parallel_blocks layers of an FP8 checkpoint cannot be widened here; "
                          f"`python -m export fuse` it first")
    if spec.parallel_layers():
        return _convert_parallel(source, Path(out), spec, tp=tp, pp=pp, dtype=dtype, progress=progress,
                                 window_bytes=window_bytes, overwrite=overwrite, follow_symlinks=follow_symlinks,
                                 embedding_shard=embedding_shard)
    job = prepare(source, tp, pp, dtype, follow_symlinks=follow_symlinks, embedding_shard=embedding_shard)
    spec, mapping, dtype, reader, plans = job.spec, job.mapping, job.dtype, job.reader, job.plans
    plan_record = _fusion_plan(source, follow_symlinks)
    start = time.perf_counter()
    planned = sum(p.nbytes(dtype) for p in plans) + sum((source / f).stat().st_size for f in job.tokenizer)
    with output_dir(out, inputs=[source], overwrite=overwrite, planned_bytes=planned) as tmp:
        ckpt = tmp / "checkpoint"
        ckpt.mkdir()
        requant = RequantError()
        written, digests = write_rank_files(reader, plans, ckpt, dtype, progress, window_bytes, spec=spec,
                                            requant=requant)
        write_trtllm_config(ckpt, spec, mapping, dtype)
        tokenizer = copy_tokenizer(source, tmp / "tokenizer", names=job.tokenizer)
        named = recorded_source or source
        manifest = Manifest(source_path=str(named.resolve()),
                            source_sha256=tree_sha256(named, digests if recorded_source is None else {}),
                            fusion_plan=plan_record, tp=tp, pp=pp, dtype=dtype, tokenizer=tokenizer,
                            engines={"cpu": {"path": "checkpoint", "verified": False}}, build=default_build(spec))
        # the checkpoint's quantization as its own config.json reads back (exclude_modules resolved)
        manifest.quantization = EngineDir.quantization_record(read_trtllm_config(ckpt)[0].quant)
        if spec.quant.fp8:  # what verify and build need to know of the FP8 conversion
            manifest.engines["cpu"]["fp8"] = {"quantization": spec.quant.describe(), **requant.to_json()}
        manifest.save(tmp)
    seconds = time.perf_counter() - start
    read = sum(reader.info(n).nbytes for n, _ in _by_source(reader, plans))
    log.info("converted %s -> %s: %d ranks, %.3f GB read, %.3f GB written in %.2f s (%.0f MB/s read)",
             source, out, mapping.world_size, read / 1e9, written / 1e9, seconds, read / 1e6 / seconds)
    if requant.layers:
        log.warning("q/k/v weight scales differ in %d layers: requantized to the max (max relative change of a "
                    "weight %.3g); verify compares against the source requantized the same way",
                    len(requant.layers), requant.max_relative())
    return ConvertResult(Path(out), manifest, read, written, seconds, requant if spec.quant.fp8 else None)


def _convert_parallel(source: Path, out: Path, spec: ModelSpec, *, tp: int, pp: int, dtype: str | None,
                      progress: bool, window_bytes: int, overwrite: bool,
                      follow_symlinks: bool | None, embedding_shard: int | None = None) -> ConvertResult:
    """A Puzzletron source with `parallel_blocks` layers: TRT-LLM's nemotron_nas has none, so each
    attention-free one becomes one wide FFN (gate/up stacked, down concatenated, each branch's norm
    folded: Theorem 3.1, as `fuse`), written in fp32 to a scratch checkpoint beside `out` (removed
    after), which is then converted; the manifest names (and hashes) the real source. Attention branches and
    plain MLPs are refused by layer before anything is written."""
    from export.fusion.fuse import widen_parallel_checkpoint

    spec.refuse_unsupported(TRTLLM_STAGE, ffn_only_parallel_ok=True)
    require_layout(spec.widened(), Mapping(tp, pp, embedding_shard=embedding_shard), trtllm=True)
    check_tree(source, follow_symlinks=follow_symlinks)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".widen-", dir=out.parent) as scratch:
        wide = Path(scratch) / "checkpoint"
        widen_parallel_checkpoint(source, wide, follow_symlinks=follow_symlinks)
        res = convert(wide, out, tp=tp, pp=pp, dtype=normalize_dtype(dtype or spec.dtype), progress=progress,
                      window_bytes=window_bytes, overwrite=overwrite, follow_symlinks=follow_symlinks,
                      embedding_shard=embedding_shard, recorded_source=source)
    log.info("converted %s: parallel_blocks layers %s each written as one wide TRT-LLM FFN",
             source, spec.parallel_layers())
    return res


def default_build(spec: ModelSpec) -> dict[str, int]:
    """trtllm-build sizes, capped by the model's context length.

    max_input_len keeps TRT-LLM's default ratio to max_seq_len (1024 of 2048) when the context is
    shorter, so a prompt of the maximum length still leaves room to generate: capping both at the
    context (512 and 512 for the demo) would let such a prompt generate nothing.
    """
    seq = min(DEFAULT_BUILD["max_seq_len"], spec.max_position_embeddings)
    ratio = DEFAULT_BUILD["max_input_len"] / DEFAULT_BUILD["max_seq_len"]
    return {**DEFAULT_BUILD, "max_seq_len": seq,
            "max_input_len": max(1, min(DEFAULT_BUILD["max_input_len"], int(seq * ratio)))}


def write_rank_files(reader: CheckpointReader, plans: list[RankPlan], ckpt: Path, dtype: str,
                     progress: bool = True, window_bytes: int = WINDOW_BYTES, *,
                     spec: ModelSpec | None = None,
                     requant: RequantError | None = None) -> tuple[int, dict[str, bytes]]:
    """The streaming pass: each source tensor read once, in row windows of at most `window_bytes`,
    each window's pieces written to every rank file at their final rows (an FP8 part of a packed
    tensor of `spec` requantized to the packed scale on the way, its change recorded in `requant`);
    then each rank's scales.

    Returns (bytes written, sha256 of each source file whose every byte the pass read).
    """
    source = RawTensors(reader)
    writers = {p.rank: SafetensorsWriter(rank_file(ckpt, p.rank), [(n, torch_dtype(p.dtype_of(n, dtype)), s)
                                                                   for n, s in p.tensors.items()])
               for p in plans}
    changes = requant_plan(spec, reader.scale) if spec is not None and spec.quant.fp8 else {}
    requant = RequantError() if requant is None else requant
    dtypes = {p.rank: {n: torch_dtype(p.dtype_of(n, dtype)) for n in p.tensors} for p in plans}
    fix = _Requant(requant)
    order = list(_by_source(reader, plans))
    written = 0
    scratch = Scratch()
    try:
        with byte_progress(sum(reader.info(n).nbytes for n, _ in order), "convert", progress) as bar:
            for name, placements in order:
                info = reader.info(name)
                rows = info.shape[0] if info.shape else 1
                step = max(1, window_bytes // max(1, info.nbytes // max(rows, 1)))
                for first in range(0, rows, step):
                    stop = min(rows, first + step)
                    chunk = source.get_slice(name, first, stop)  # also hashed, in a thread, while it is written
                    for p in placements:
                        written += _write_window(writers[p.rank], p, chunk, first, stop, dtypes[p.rank][p.name],
                                                 scratch, fix, changes.get(_key(p)))
                    bar.update(chunk.numel() * chunk.element_size())
                    del chunk
                for p in placements:
                    written += _write_padding(writers[p.rank], p, dtypes[p.rank][p.name])
            for plan in plans:
                written += _write_scales(writers[plan.rank], plan, reader)
    except BaseException:
        for w in writers.values():
            _close_quietly(w)
        raise
    finally:
        digests = source.close()
    for w in writers.values():
        w.close()
    return written, digests


class _Requant:
    """Requantizes FP8 pieces (own scale -> packed scale) in reused buffers, recording the change.

    The same arithmetic as `fp8.requantize` (dequantize, divide by the new scale, saturate, round to
    E4M3), done in place, a block of rows at a time: fresh fp32 copies per piece (and the casts'
    own temporaries, which torch makes for float8) made peak RSS creep up with the layer count
    (+70 MiB from 2 to 6 layers of Llama-3.1-8B shapes at tp 4), as `Scratch` explains."""

    BLOCK = 1 << 18  # elements per step: every temporary is at most 1 MiB of fp32

    def __init__(self, errors: RequantError) -> None:
        self.errors = errors
        self._old, self._new, self._out = Scratch(), Scratch(), Scratch()

    def __call__(self, piece: torch.Tensor, change: tuple[float, float], layer: int | None) -> torch.Tensor:
        own, new = change
        out = self._out.like(piece, torch.float8_e4m3fn)
        rows = max(1, self.BLOCK // max(1, piece[0].numel())) if piece.dim() else 1
        moved = amax = 0.0
        for first in range(0, piece.shape[0] if piece.dim() else 1, rows):
            part = piece[first:first + rows]
            old = self._old.like(part, torch.float32).copy_(part).mul_(own)  # the weight as the source holds it
            out[first:first + rows].copy_(self._new.like(part, torch.float32).copy_(old).div_(new)
                                          .clamp_(-FP8_MAX, FP8_MAX))
            diff = self._new.like(part, torch.float32).copy_(out[first:first + rows]).mul_(new).sub_(old)
            moved, amax = max(moved, _amax(diff)), max(amax, _amax(old))
        self.errors.record(layer, moved, amax)
        return out


def _amax(t: torch.Tensor) -> float:
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def _key(p: Placement) -> tuple:
    return (p.piece.ref.role, p.piece.ref.layer, p.piece.ref.branch)


def _write_window(w: SafetensorsWriter, p: Placement, chunk: torch.Tensor, first: int, stop: int,
                  dtype: torch.dtype, scratch: Scratch, fix: _Requant | None = None,
                  change: tuple[float, float] | None = None) -> int:
    fed = window(p, first, stop)
    if fed is None:
        return 0
    shard, row = fed
    piece = take(chunk, shard, tuple(chunk.shape))
    if change is not None and fix is not None:  # an FP8 part of a packed tensor whose scale changes
        piece = fix(piece, change, p.piece.ref.layer)
    if piece.dtype != dtype or not piece.is_contiguous():  # a column slice, or a cast: packed in reused memory
        piece = scratch.like(piece, dtype).copy_(piece)
    return w.write_rows(p.name, row, piece)


def _write_scales(w: SafetensorsWriter, plan: RankPlan, reader: CheckpointReader) -> int:
    """The rank's per-tensor scales, from the source's (validated, so finite and > 0): the same
    values on every rank, since per-tensor scales are not sharded."""
    return sum(w.write(name, torch.tensor([scale_value(v, reader.scale)], dtype=torch.float32))
               for name, v in plan.scales.items())


class Scratch:
    """One growing buffer for pieces that must be packed (column slices) or cast before writing.

    Allocating a fresh tensor per piece made peak RSS creep up with the number of pieces (heap
    fragmentation between 16-32 MiB blocks: +43 MiB from 16 to 32 layers of Llama-3.1-8B)."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def like(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        nbytes = t.numel() * dtype.itemsize
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes].view(dtype).view(t.shape)


def _write_padding(w: SafetensorsWriter, p: Placement, dtype: torch.dtype) -> int:
    """lm_head's zero rows past the vocabulary (the shard's `pad`)."""
    s = p.piece.shard
    if not s.pad:
        return 0
    zeros = torch.zeros((s.pad, *p.piece.shape[1:]), dtype=dtype)
    return w.write_rows(p.name, p.row + s.stop - s.start, zeros)


def _by_source(reader: CheckpointReader, plans: list[RankPlan]) -> Iterator[tuple[str, list[Placement]]]:
    """Placements grouped by the source tensor they read, in file-locality order."""
    groups: dict[str, list[Placement]] = {}
    for plan in plans:
        for p in plan.placements:
            groups.setdefault(p.piece.ref.hf_name, []).append(p)
    yield from sorted(groups.items(), key=lambda kv: (reader.file_of(kv[0]), reader.info(kv[0]).begin))


def _close_quietly(w: SafetensorsWriter) -> None:
    with contextlib.suppress(ValueError, OSError):  # already failing; report the first error
        w.close()


def tokenizer_files(source: Path, *, follow_symlinks: bool | None = None) -> list[str]:
    """The tokenizer files `copy_tokenizer` will copy, each inside the source, and tokenizer.json
    loadable: checked here so a broken one fails `convert`, not the server that later loads it."""
    names = [f for f in TOKENIZER_FILES if checkpoint_file(source, f, follow_symlinks=follow_symlinks).is_file()]
    if not any(f in names for f in TOKENIZER_CORE):
        return []
    if TOKENIZER_JSON in names:
        check_tokenizer_json(source / TOKENIZER_JSON)
    return names


def copy_tokenizer(source: Path, dst: Path, *, names: list[str] | None = None,
                   follow_symlinks: bool | None = None) -> str | None:
    """Copy the source's tokenizer files (`names` from `tokenizer_files`, or found now) as plain
    files; None (nothing created) when it has no tokenizer."""
    names = tokenizer_files(source, follow_symlinks=follow_symlinks) if names is None else names
    if not names:
        log.warning("%s has no tokenizer (%s); serving will need one", source, " / ".join(TOKENIZER_CORE))
        return None
    dst.mkdir()
    for f in names:
        shutil.copy2(source / f, dst / f)  # a link's content, never the link
    return dst.name


def _fusion_plan(source: Path, follow_symlinks: bool | None) -> dict | None:
    p = checkpoint_file(source, FUSION_PLAN, follow_symlinks=follow_symlinks)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{p}: not valid JSON ({e})") from None

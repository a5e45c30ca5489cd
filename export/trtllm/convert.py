"""HF checkpoint -> TRT-LLM checkpoint in one streaming pass, all ranks written by one process.

Every rank file's header is planned up front (`plan`), then each source tensor is read once, in
file order and in row windows of at most 64 MiB, each window cut into its pieces for every rank
(`export.sharding` via the plan) and each piece written at its final rows; q, k and v land in their
row ranges of the rank's qkv. Peak memory is a couple of windows, whatever the model or tensor size
(Ultra's widest fused FFN matrix alone is 14 GB). Everything is checked before the first byte is
written, and the output appears atomically with its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.errors import CheckpointError, ExportError
from export.io.atomic import atomic_output_dir
from export.io.reader import CheckpointReader
from export.io.safetensors_format import SafetensorsWriter, read_header, torch_dtype
from export.layout import require_layout
from export.manifest import DEFAULT_BUILD, Manifest, tree_sha256
from export.mapping import Mapping
from export.progress import byte_progress
from export.sharding import take
from export.spec import ModelSpec, normalize_dtype
from export.trtllm.config import write_trtllm_config
from export.trtllm.plan import Placement, RankPlan, check_complete, plan_checkpoint, window
from export.trtllm.weights import rank_file

log = logging.getLogger(__name__)

# Files that make up a tokenizer (copied to engines/NAME/tokenizer/); the first group must be present.
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = (*TOKENIZER_CORE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json")
FUSION_PLAN = "fusion_plan.json"  # written by `fuse` beside the fused checkpoint
WINDOW_BYTES = 64 << 20  # source rows read at a time: bounds memory whatever the largest tensor


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    manifest: Manifest
    bytes_read: int
    bytes_written: int
    seconds: float


def prepare(source: Path, tp: int, pp: int, dtype: str | None, embedding_shard: int | None = None
            ) -> tuple[ModelSpec, Mapping, str, CheckpointReader, list[RankPlan]]:
    """Everything that can refuse the job, before any output exists."""
    spec = ModelSpec.load(source)
    mapping = Mapping(tp, pp, embedding_shard=embedding_shard)
    require_layout(spec, mapping, trtllm=True)
    reader = CheckpointReader(source)
    reader.validate(spec)
    plans = plan_checkpoint(spec, mapping)
    problems = check_complete(spec, mapping, plans)
    if problems:  # a bug in the tables, not in the input
        raise AssertionError("incomplete TRT-LLM plan:\n  - " + "\n  - ".join(problems))
    return spec, mapping, normalize_dtype(dtype or spec.dtype), reader, plans


def convert(source: Path, out: Path, *, tp: int, pp: int = 1, dtype: str | None = None,
            progress: bool = True, window_bytes: int = WINDOW_BYTES,
            embedding_shard: int | None = None) -> ConvertResult:
    """Write `out/` = checkpoint/ (config.json + rank{r}.safetensors), tokenizer/, manifest.json.

    `embedding_shard` 0 or 1 splits the embedding across the tp ranks (TRT-LLM's
    `use_parallel_embedding` with that `embedding_sharding_dim`) instead of repeating it."""
    source = Path(source)
    spec, mapping, dtype, reader, plans = prepare(source, tp, pp, dtype, embedding_shard)
    start = time.perf_counter()
    with atomic_output_dir(out) as tmp:
        ckpt = tmp / "checkpoint"
        ckpt.mkdir()
        written, digests = write_rank_files(reader, plans, ckpt, dtype, progress, window_bytes)
        write_trtllm_config(ckpt, spec, mapping, dtype)
        tokenizer = copy_tokenizer(source, tmp / "tokenizer")
        manifest = Manifest(source_path=str(source.resolve()), source_sha256=tree_sha256(source, digests),
                            fusion_plan=_fusion_plan(source), tp=tp, pp=pp, dtype=dtype, tokenizer=tokenizer,
                            engines={"cpu": {"path": "checkpoint", "verified": False}}, build=default_build(spec))
        manifest.save(tmp)
    seconds = time.perf_counter() - start
    read = sum(reader.info(n).nbytes for n, _ in _by_source(reader, plans))
    log.info("converted %s -> %s: %d ranks, %.2f GB read, %.2f GB written in %.1f s (%.2f GB/s read)",
             source, out, mapping.world_size, read / 1e9, written / 1e9, seconds, read / 1e9 / seconds)
    return ConvertResult(Path(out), manifest, read, written, seconds)


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
                     progress: bool = True, window_bytes: int = WINDOW_BYTES) -> tuple[int, dict[str, bytes]]:
    """The streaming pass: each source tensor read once, in row windows of at most `window_bytes`,
    each window's pieces written to every rank file at their final rows.

    Returns (bytes written, sha256 of each source file whose every byte the pass read).
    """
    tdtype = torch_dtype(dtype)
    source = RawTensors(reader)
    writers = {p.rank: SafetensorsWriter(rank_file(ckpt, p.rank), [(n, tdtype, s) for n, s in p.tensors.items()])
               for p in plans}
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
                    chunk = source.read(name, first, stop)  # also hashed, in a thread, while it is written
                    for p in placements:
                        written += _write_window(writers[p.rank], p, chunk, first, stop, tdtype, scratch)
                    bar.update(chunk.numel() * chunk.element_size())
                    del chunk
                for p in placements:
                    written += _write_padding(writers[p.rank], p, tdtype)
    except BaseException:
        for w in writers.values():
            _close_quietly(w)
        raise
    finally:
        digests = source.close()
    for w in writers.values():
        w.close()
    return written, digests


def _write_window(w: SafetensorsWriter, p: Placement, chunk: torch.Tensor, first: int, stop: int,
                  dtype: torch.dtype, scratch: Scratch) -> int:
    fed = window(p, first, stop)
    if fed is None:
        return 0
    shard, row = fed
    piece = take(chunk, shard, tuple(chunk.shape))
    if piece.dtype != dtype or not piece.is_contiguous():  # a column slice, or a cast: packed in reused memory
        piece = scratch.like(piece, dtype).copy_(piece)
    return w.write_rows(p.name, row, piece)


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


class RawTensors:
    """Row windows by `pread` into one of two reused buffers (not a memory map), hashed on the way.

    A map keeps every page it touched resident in this process until it is closed, so the RSS of
    a long pass would grow to the model size. A fresh buffer per window is no better for speed: a
    64 MiB allocation is a new mapping each time, and faulting in and zeroing its pages cost more
    than the read itself. So two buffers alternate: one being hashed while the next is read into
    the other; a window returned by `read` stays valid until the second `read` after it. Each
    file's sha256 (header, then tensors in offset order) is fed from these same buffers by a helper
    thread (hashlib releases the GIL), so the manifest's content hash costs no second read. A file
    read with gaps (tensors the model does not use) is left for `tree_sha256` to hash itself.
    """

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self._files: dict[str, tuple[int, int]] = {}  # name -> (fd, data_start)
        self._hash: dict[str, tuple[Any, int]] = {}  # file -> (sha256, next data offset expected)
        self._hasher = ThreadPoolExecutor(1)
        self._pending: Future | None = None
        self._buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * 2
        self._turn = 0

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The next of the two buffers, grown to `nbytes`. Its last window (the one before last) is
        hashed already: `_feed` of the last window waited for it."""
        self._turn ^= 1
        if self._buffers[self._turn].numel() < nbytes:
            self._buffers[self._turn] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[self._turn][:nbytes]

    def _file(self, fname: str) -> tuple[int, int]:
        if fname not in self._files:
            path = self.reader.path / fname
            _, _, data_start = read_header(path)
            fd = os.open(path, os.O_RDONLY)
            self._files[fname] = (fd, data_start)
            self._hash[fname] = (hashlib.sha256(os.pread(fd, data_start, 0)), 0)
        return self._files[fname]

    def read(self, name: str, first: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [first, stop) of tensor `name` (all of it by default)."""
        info, fname = self.reader.info(name), self.reader.file_of(name)
        fd, data_start = self._file(fname)
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else stop
        row_bytes = info.nbytes // rows if rows else 0
        begin = info.begin + first * row_bytes
        buf = self._buffer((stop - first) * row_bytes)
        view, pos = memoryview(buf.numpy()), data_start + begin
        while view:
            n = os.preadv(fd, [view], pos)
            if n == 0:
                raise CheckpointError(f"tensor {name}: file ends early", self.reader.path / fname)
            view, pos = view[n:], pos + n
        self._feed(fname, begin, buf)
        return buf.view(info.dtype).reshape((stop - first, *info.shape[1:]) if info.shape else ())

    def _feed(self, fname: str, begin: int, buf: torch.Tensor) -> None:
        if self._pending is not None:
            self._pending.result()  # at most one buffer waits for the hash
        h, expected = self._hash[fname]
        if h is None or begin != expected:
            self._hash[fname] = (None, -1)
            return
        self._hash[fname] = (h, begin + buf.numel())
        self._pending = self._hasher.submit(h.update, buf.numpy())

    def close(self) -> dict[str, bytes]:
        """Close the files; sha256 of every file read whole."""
        if self._pending is not None:
            self._pending.result()
        self._hasher.shutdown()
        done = {}
        for fname, (fd, data_start) in self._files.items():
            h, end = self._hash[fname]
            if h is not None and end == os.fstat(fd).st_size - data_start:
                done[fname] = h.digest()
            os.close(fd)
        self._files.clear()
        return done


def _by_source(reader: CheckpointReader, plans: list[RankPlan]) -> Iterator[tuple[str, list[Placement]]]:
    """Placements grouped by the source tensor they read, in file-locality order."""
    groups: dict[str, list[Placement]] = {}
    for plan in plans:
        for p in plan.placements:
            groups.setdefault(reader.hf_name(p.piece.ref), []).append(p)
    yield from sorted(groups.items(), key=lambda kv: (reader.file_of(kv[0]), reader.info(kv[0]).begin))


def _close_quietly(w: SafetensorsWriter) -> None:
    with contextlib.suppress(ValueError, OSError):  # already failing; report the first error
        w.close()


def copy_tokenizer(source: Path, dst: Path) -> str | None:
    """Copy the source's tokenizer files; None (nothing created) when it has no tokenizer."""
    if not any((source / f).is_file() for f in TOKENIZER_CORE):
        log.warning("%s has no tokenizer (%s); serving will need one", source, " / ".join(TOKENIZER_CORE))
        return None
    dst.mkdir()
    for f in TOKENIZER_FILES:
        if (source / f).is_file():
            shutil.copy2(source / f, dst / f)
    return dst.name


def _fusion_plan(source: Path) -> dict | None:
    p = source / FUSION_PLAN
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{p}: not valid JSON ({e})") from None

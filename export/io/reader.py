"""Lazy, memory-mapped reading of safetensors checkpoints, one tensor or one slice at a time.

The one validated reader every weights format reads through (`export.sources`): an HF checkpoint
(one file, or shards named by an index), or a chosen set of files (a TRT-LLM rank file).

`CheckpointReader.validate(spec)` checks the index against the files and every tensor the
description needs (presence, shape, dtype, bytes on disk) and reports all problems at once,
before any stage writes anything. Pickle checkpoints are refused outright.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from export.errors import CheckpointError
from export.io.paths import checkpoint_file, default_follow_symlinks
from export.io.safetensors_format import TensorInfo, json_kind, read_header, torch_dtype
from export.sharding import Shard, take
from export.spec import ModelSpec
from export.tensors import (
    HF_IGNORED_SUFFIXES,
    HF_NAMES,
    ScaleRef,
    TensorRef,
    kv_scale_names,
    model_tensors,
    scale_refs,
    stored_dtype,
    tied_tensors,
)

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # ModelOpt writes float32

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointReader:
    """A directory of `*.safetensors` (one file, or shards named by an index).

    Every file it opens is checked by `export.io.paths` (inside the checkpoint, symlinks only into
    it or the hub cache's blobs unless `follow_symlinks`) and every header by `read_header`.
    """

    def __init__(self, path: str | Path, *, follow_symlinks: bool | None = None,
                 files: list[str] | None = None) -> None:
        """`files`: read only these weight files of the directory (no index), e.g. one rank's."""
        self.path = Path(path)
        self._only = files
        self.follow_symlinks = default_follow_symlinks() if follow_symlinks is None else follow_symlinks
        if self.path.is_file() and self.path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_msg([self.path.name]), self.path)
        if not self.path.is_dir():
            raise CheckpointError("checkpoint directory does not exist", self.path)
        self._file(CONFIG)  # read by ModelSpec, not here, but the checkpoint's boundary is checked in one place
        self._layout: dict[str, tuple[int, int]] = {}  # file -> (data_start, file size) as validated
        self._files, self._infos, self._where = self._index()
        self._handles: dict[str, Any] = {}
        self._scales: dict[ScaleRef, float] = {}

    # ---- discovery -------------------------------------------------------------------
    def _file(self, fname: str) -> Path:
        return checkpoint_file(self.path, fname, follow_symlinks=self.follow_symlinks)

    def _index(self) -> tuple[list[str], dict[str, TensorInfo], dict[str, str]]:
        index = self._file(INDEX)
        problems: list[str] = []
        if self._only is not None:
            files, weight_map = list(self._only), {}
        elif index.is_file():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = {}
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            raise CheckpointError(_pickle_msg(pickles) if pickles else "no *.safetensors files",
                                  self.path)
        infos: dict[str, TensorInfo] = {}
        where: dict[str, str] = {}
        for fname in files:
            try:
                fpath = self._file(fname)
            except CheckpointError as e:
                problems += e.problems
                continue
            if not fpath.is_file():
                problems.append(f"index names file {fname}, which does not exist")
                continue
            try:
                file_infos, _, data_start = read_header(fpath)
            except CheckpointError as e:
                problems += [f"{fname}: {p}" for p in e.problems]
                continue
            self._layout[fname] = (data_start, fpath.stat().st_size)
            for name, info in file_infos.items():
                if weight_map and weight_map.get(name) != fname:
                    problems.append(f"tensor {name} is in {fname} but the index does not say so")
                if name in where:
                    problems.append(f"tensor {name} is in both {where[name]} and {fname}")
                infos[name], where[name] = info, fname
        for name, fname in weight_map.items():
            if name not in where and fname in self._layout:
                problems.append(f"index places tensor {name} in {fname}, which does not hold it")
        if problems:
            raise CheckpointError(problems, self.path)
        return files, infos, where

    # ---- access ----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise CheckpointError(f"tensor {name} is not in the checkpoint", self.path)
        return self._infos[name]

    def file_of(self, name: str) -> str:
        return self._where[name]

    def file_path(self, fname: str) -> Path:
        """The checked path of one of the checkpoint's weight files."""
        return self._file(fname)

    def data_layout(self, fname: str) -> tuple[int, int]:
        """(data_start, file size) of a weight file, from its validated header: readers that `pread`
        by offset use these instead of parsing the header a second time."""
        return self._layout[fname]

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def _handle(self, fname: str) -> Any:
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self._file(fname)), framework="pt")
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._handle(self._where[name]).get_tensor(name)

    def get_slice(self, name: str) -> Any:
        self.info(name)
        return self._handle(self._where[name]).get_slice(name)

    def read(self, ref: TensorRef, shard: Shard | None = None) -> torch.Tensor:
        """The tensor for `ref` (or only the `shard` of it: a sliced read, not a full one); a tied
        tensor is read under the name of the one it aliases (`TensorRef.hf_name`)."""
        if shard is None or shard.dim is None:
            return self.get(ref.hf_name)
        return take(self.get_slice(ref.hf_name), shard, ref.shape)

    def scale(self, ref: ScaleRef) -> float:
        """A per-tensor scale (validated by `validate`: one stored name, scalar, finite, > 0)."""
        if ref not in self._scales:
            name = self._scale_name(ref)
            if name is None:
                raise CheckpointError(f"missing tensor {ref.name} ({ref.kind.value} of {ref.where()})", self.path)
            self._scales[ref] = float(self.get(name).float().reshape(-1)[0])
        return self._scales[ref]

    def _scale_name(self, ref: ScaleRef) -> str | None:
        return next((n for n in ref.names if n in self._infos), None)

    def hf_name(self, ref: TensorRef) -> str:
        """The name `ref`'s bytes are stored under (for a tied tensor, the aliased one's)."""
        return ref.hf_name

    def close(self) -> None:
        self._handles.clear()

    # ---- validation ------------------------------------------------------------------
    def validate(self, spec: ModelSpec) -> list[TensorRef]:
        """Check every tensor the description needs; raise with all problems, else return refs."""
        refs = model_tensors(spec)
        problems: list[str] = []
        needed = set()
        for ref in refs:
            name = ref.hf_name
            needed.add(name)
            info = self._infos.get(name)
            if info is None:
                problems.append(f"missing tensor {name} ({ref.role.value} of "
                                f"{_where(ref)}, shape {list(ref.shape)})")
                continue
            if info.shape != ref.shape:
                problems.append(f"tensor {name}: shape {list(info.shape)}, expected {list(ref.shape)}")
            want = stored_dtype(spec, ref)
            if info.dtype != torch_dtype(want):
                why = " (the checkpoint's quantization config says this linear is FP8)" if want != spec.dtype else ""
                problems.append(f"tensor {name}: dtype {_dt(info.dtype)}, expected {want}{why}")
        for sref in scale_refs(spec):
            problems += self._check_scale(sref, needed)
        kv_scales = kv_scale_names(spec)  # calibrated KV scales of a cache left in the model dtype
        extras = [n for n in self._infos if n not in needed and n not in kv_scales and not _ignorable(n, spec)]
        problems += [f"unexpected tensor {n}: the config describes no such weight" for n in extras]
        if problems:
            raise CheckpointError(problems, self.path)
        return refs


    def _check_scale(self, ref: ScaleRef, needed: set[str]) -> list[str]:
        """A scale must be stored under one of its names, as a float scalar (shape [] or [1]),
        finite and > 0: a zero or NaN scale turns every product of its linear into garbage."""
        present = [n for n in ref.names if n in self._infos]
        needed.update(present)
        if not present:
            return [f"missing tensor {ref.name} ({ref.kind.value} of {ref.where()}: the quantization config "
                    f"makes this {'linear FP8' if ref.kind.value.endswith('t_scale') else 'KV cache FP8'})"]
        if len(present) > 1:
            return [f"tensors {' and '.join(present)}: the same {ref.kind.value} stored twice"]
        info = self._infos[present[0]]
        if info.shape not in ((), (1,)) or info.dtype not in SCALE_DTYPES:
            return [f"tensor {present[0]}: shape {list(info.shape)} dtype {_dt(info.dtype)}, expected a per-tensor "
                    f"scale (shape [] or [1], float32)"]
        value = self.scale(ref)
        if not math.isfinite(value) or value <= 0:
            return [f"tensor {present[0]}: {ref.kind.value} is {value}, expected a finite scale > 0"]
        return []


def read_index(path: Path) -> dict[str, str]:
    """`weight_map` of a model.safetensors.index.json: an object of tensor name -> file name."""
    try:
        index = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"not valid JSON ({' '.join(str(e).split())})", path) from None
    if not isinstance(index, dict):
        raise CheckpointError(f"is a JSON {json_kind(index)}, not an object with a weight_map", path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        what = "missing" if "weight_map" not in index else f"a JSON {json_kind(weight_map)}"
        raise CheckpointError(f"weight_map is {what}, not an object of tensor name -> file name", path)
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"weight_map[{name!r}] is {fname!r}, not a file name", path)
    return weight_map


def _where(ref: TensorRef) -> str:
    return f"layer {ref.layer}" if ref.layer is not None else "the model"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ignorable(name: str, spec: ModelSpec) -> bool:
    if name.endswith(HF_IGNORED_SUFFIXES):
        return True
    return name in {HF_NAMES[r.role] for r in tied_tensors(spec)}  # a tied tensor's own copy, unused


def _pickle_msg(names: list[str]) -> str:
    return (f"pickle checkpoint(s) refused: {', '.join(sorted(names))}. Loading pickle can run "
            f"arbitrary code; convert to safetensors first (e.g. transformers "
            f"`save_pretrained(..., safe_serialization=True)`)")

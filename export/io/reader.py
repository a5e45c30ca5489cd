"""Lazy, memory-mapped reading of HF safetensors checkpoints, one tensor or one slice at a time.

`CheckpointReader.validate(spec)` checks the index against the files and every tensor the
description needs (presence, shape, dtype, bytes on disk) and reports all problems at once,
before any stage writes anything. Pickle checkpoints are refused outright.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from export.errors import CheckpointError
from export.io.safetensors_format import TensorInfo, read_header, torch_dtype
from export.sharding import Shard, take
from export.spec import ModelSpec
from export.tensors import HF_IGNORED_SUFFIXES, HF_NAMES, Role, TensorRef, model_tensors

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointReader:
    """A directory of `*.safetensors` (one file, or shards named by an index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file() and self.path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_msg([self.path.name]), self.path)
        if not self.path.is_dir():
            raise CheckpointError("checkpoint directory does not exist", self.path)
        self._files, self._infos, self._where = self._index()
        self._handles: dict[str, Any] = {}

    # ---- discovery -------------------------------------------------------------------
    def _index(self) -> tuple[list[str], dict[str, TensorInfo], dict[str, str]]:
        index = self.path / INDEX
        problems: list[str] = []
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
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
            fpath = self.path / fname
            if not fpath.is_file():
                problems.append(f"index names file {fname}, which does not exist")
                continue
            try:
                file_infos, _, _ = read_header(fpath)
            except CheckpointError as e:
                problems += [f"{fname}: {p}" for p in e.problems]
                continue
            for name, info in file_infos.items():
                if weight_map and weight_map.get(name) != fname:
                    problems.append(f"tensor {name} is in {fname} but the index does not say so")
                if name in where:
                    problems.append(f"tensor {name} is in both {where[name]} and {fname}")
                infos[name], where[name] = info, fname
        for name, fname in weight_map.items():
            if name not in where and (self.path / fname).is_file():
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

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def _handle(self, fname: str) -> Any:
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.path / fname), framework="pt")
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._handle(self._where[name]).get_tensor(name)

    def get_slice(self, name: str) -> Any:
        self.info(name)
        return self._handle(self._where[name]).get_slice(name)

    def read(self, ref: TensorRef, shard: Shard | None = None) -> torch.Tensor:
        """The tensor for `ref` (or only the `shard` of it: a sliced read, not a full one)."""
        name = self.hf_name(ref)
        if shard is None or shard.dim is None:
            return self.get(name)
        return take(self.get_slice(name), shard, ref.shape)

    def hf_name(self, ref: TensorRef) -> str:
        """Tied checkpoints may lack lm_head; the embedding stands in for it."""
        if ref.role is Role.LM_HEAD and ref.hf_name not in self._infos:
            return HF_NAMES[Role.EMBED]
        return ref.hf_name

    def close(self) -> None:
        self._handles.clear()

    # ---- validation ------------------------------------------------------------------
    def validate(self, spec: ModelSpec) -> list[TensorRef]:
        """Check every tensor the description needs; raise with all problems, else return refs."""
        refs = model_tensors(spec)
        want = torch_dtype(spec.dtype)
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
            if info.dtype != want:
                problems.append(f"tensor {name}: dtype {_dt(info.dtype)}, expected {spec.dtype}")
        extras = [n for n in self._infos if n not in needed and not _ignorable(n, spec)]
        problems += [f"unexpected tensor {n}: the config describes no such weight" for n in extras]
        if problems:
            raise CheckpointError(problems, self.path)
        return refs


def _where(ref: TensorRef) -> str:
    return f"layer {ref.layer}" if ref.layer is not None else "the model"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ignorable(name: str, spec: ModelSpec) -> bool:
    if name.endswith(HF_IGNORED_SUFFIXES):
        return True
    return spec.tie_embeddings and name == HF_NAMES[Role.LM_HEAD]


def _pickle_msg(names: list[str]) -> str:
    return (f"pickle checkpoint(s) refused: {', '.join(sorted(names))}. Loading pickle can run "
            f"arbitrary code; convert to safetensors first (e.g. transformers "
            f"`save_pretrained(..., safe_serialization=True)`)")

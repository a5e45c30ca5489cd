"""Streaming, sharded HF safetensors output with an index.

The caller declares every tensor (name, dtype, shape) up front; the writer plans shard files and
their headers, then accepts tensors one at a time in any order and drops them after writing.
Use inside `atomic_output_dir` so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from export.io.safetensors_format import SafetensorsWriter

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
REWRITTEN = {"config.json", INDEX, "pytorch_model.bin.index.json"}

Entry = tuple[str, torch.dtype, tuple[int, ...]]


def _nbytes(entry: Entry) -> int:
    n = torch.empty((), dtype=entry[1]).element_size()
    for d in entry[2]:
        n *= d
    return n


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nb = _nbytes(e)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nb
    return shards


class HFCheckpointWriter:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the index when sharded."""

    def __init__(self, directory: Path, entries: list[Entry], max_shard_bytes: int = 5 << 30) -> None:
        self.directory = Path(directory)
        shards = plan_shards(entries, max_shard_bytes)
        n = len(shards)
        self._files: dict[str, SafetensorsWriter] = {}
        self._weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            w = SafetensorsWriter(self.directory / fname, shard)
            for name, _, _ in shard:
                self._weight_map[name] = fname
            self._files[fname] = w
        self.total_bytes = sum(w.total_bytes for w in self._files.values())

    def write(self, name: str, tensor: torch.Tensor) -> int:
        return self._files[self._weight_map[name]].write(name, tensor)

    def write_rows(self, name: str, first_row: int, tensor: torch.Tensor) -> int:
        """Part of a tensor: rows [first_row, first_row + len(tensor)) along dim 0 (see SafetensorsWriter)."""
        return self._files[self._weight_map[name]].write_rows(name, first_row, tensor)

    def close(self) -> None:
        for w in self._files.values():
            w.close()
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self._weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_sidecars(src: Path, dst: Path) -> list[str]:
    """Copy what sits beside the weights (tokenizer, generation config, remote code, cards).

    config.json and weight files are not copied: the caller writes its own.
    """
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.name in REWRITTEN or p.suffix in WEIGHT_SUFFIXES or p.name.startswith("."):
            continue
        target = Path(dst) / p.name
        if p.is_dir():
            shutil.copytree(p, target)
        else:
            shutil.copy2(p, target)
        copied.append(p.name)
    return copied


def write_config(directory: Path, config: dict) -> None:
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")

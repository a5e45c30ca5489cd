"""Streaming, sharded HF safetensors output with an index.

The caller declares every tensor (name, dtype, shape) up front; the writer plans shard files and
their headers, then accepts tensors one at a time in any order and drops them after writing.
Use inside `export.io.output.output_dir` so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from export.errors import CheckpointError
from export.io.paths import checkpoint_file
from export.io.safetensors_format import SafetensorsWriter
from export.io.tokenizer_file import TOKENIZER_JSON, check_tokenizer_json
from export.quantization import HF_QUANT_CONFIG, Quantization

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


def sidecar_files(src: Path, *, follow_symlinks: bool | None = None) -> list[str]:
    """What `copy_sidecars` copies (tokenizer, generation config, remote code, cards), checked first.

    config.json and weight files are not copied: the caller writes its own. Each name is a regular
    file inside the checkpoint (`export.io.paths`); real subdirectories are walked, but a symlinked
    directory is refused rather than copied recursively (it may lead anywhere, or loop), and a
    tokenizer.json must load. Call it before the output exists, so a bad side file writes nothing.
    """
    src = Path(src)
    names: list[str] = []
    for p in sorted(src.iterdir()):
        if p.name in REWRITTEN or p.suffix in WEIGHT_SUFFIXES or p.name.startswith("."):
            continue
        _collect(src, p.name, follow_symlinks, names)
    if TOKENIZER_JSON in names:
        check_tokenizer_json(src / TOKENIZER_JSON)
    return names


def _collect(src: Path, rel: str, follow_symlinks: bool | None, names: list[str]) -> None:
    path = checkpoint_file(src, rel, follow_symlinks=follow_symlinks)
    if path.is_symlink() and path.is_dir():
        raise CheckpointError(f"{rel} is a symlink to a directory ({os.readlink(path)}); side files are "
                              f"copied as files, never as a linked tree", src)
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if not child.name.startswith("."):
                _collect(src, f"{rel}/{child.name}", follow_symlinks, names)
    elif path.is_file():
        names.append(rel)
    else:
        raise CheckpointError(f"{rel} is not a regular file", src)


def copy_sidecars(src: Path, dst: Path, *, names: list[str] | None = None,
                  follow_symlinks: bool | None = None) -> list[str]:
    """Copy the side files (`names` from `sidecar_files`, or found now) as plain files into `dst`."""
    names = sidecar_files(src, follow_symlinks=follow_symlinks) if names is None else names
    for rel in names:
        target = Path(dst) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(src) / rel, target)  # a link's content, never the link
    return names


def write_config(directory: Path, config: dict) -> None:
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_quant_config(directory: Path, quant: Quantization) -> None:
    """ModelOpt's hf_quant_config.json beside config.json (a quantized checkpoint only): vLLM
    and TensorRT-LLM's PyTorch backend detect a ModelOpt checkpoint by this file."""
    if not quant.is_none:
        (Path(directory) / HF_QUANT_CONFIG).write_text(json.dumps(quant.hf_quant_config(), indent=2) + "\n")

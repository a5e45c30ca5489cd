"""The safetensors file layout, read and written directly.

We parse headers ourselves so a truncated or inconsistent file is reported by name before any
weight is touched, and we write headers up front so tensors can stream into their final offsets
in any order, several files at once, without holding a file's contents in memory.
Layout: u64 little-endian header length, JSON header (space-padded to 8 bytes), raw data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from export.errors import CheckpointError

ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def torch_dtype(name: str) -> torch.dtype:
    return DTYPE_NAMES[name]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors, metadata, data_start), checking the file holds every byte the header promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError("file is truncated (no header)", path)
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"file is truncated or not safetensors (header of {n} bytes)", path)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"header is not valid JSON ({e})", path) from None
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    data_len = size - 8 - n
    for name, h in header.items():
        dt = ST_DTYPES.get(h.get("dtype"))
        if dt is None:
            problems.append(f"tensor {name}: unsupported dtype {h.get('dtype')!r}")
            continue
        begin, end = h["data_offsets"]
        if end > data_len:
            problems.append(f"tensor {name}: data ends at byte {end} but the file holds {data_len} "
                            f"(file is truncated)")
        infos[name] = TensorInfo(name, dt, tuple(h["shape"]), begin, end)
    if problems:
        raise CheckpointError(problems, path)
    return infos, metadata, 8 + n


class SafetensorsWriter:
    """One safetensors file whose header is fixed at creation; tensors land at their offsets.

    Every planned tensor must be written exactly once before `close()`.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for name, dtype, shape in entries:
            if name in self._slots:
                raise ValueError(f"tensor {name} planned twice in {path.name}")
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (dtype, tuple(shape), offset, nbytes)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self.total_bytes = offset
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(blob)) + blob)
        os.ftruncate(self._fd, self._data_start + offset)
        self._written: set[str] = set()
        self._rows: dict[str, list[tuple[int, int]]] = {}

    def write(self, name: str, tensor: torch.Tensor) -> int:
        if name not in self._slots:
            raise KeyError(f"tensor {name} was not planned for {self.path.name}")
        if name in self._written:
            raise ValueError(f"tensor {name} written twice to {self.path.name}")
        dtype, shape, offset, nbytes = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {shape} {dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        pos = self._data_start + offset
        while view:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n
        self._written.add(name)
        return nbytes

    def write_rows(self, name: str, rows: torch.Tensor, start: int) -> int:
        """Rows [start, start + len(rows)) of tensor `name` (dim 0), so a tensor larger than memory
        can be assembled piece by piece. The tensor counts as written once every row is."""
        if name not in self._slots:
            raise KeyError(f"tensor {name} was not planned for {self.path.name}")
        dtype, shape, offset, _ = self._slots[name]
        stop = start + rows.shape[0]
        if tuple(rows.shape[1:]) != shape[1:] or rows.dtype != dtype or start < 0 or stop > shape[0]:
            raise ValueError(f"tensor {name}: rows [{start}, {stop}) of {tuple(rows.shape)} {rows.dtype} "
                             f"do not fit planned {shape} {dtype}")
        done = self._rows.setdefault(name, [])
        if name in self._written or any(a < stop and start < b for a, b in done):
            raise ValueError(f"tensor {name}: rows [{start}, {stop}) written twice to {self.path.name}")
        row_bytes = _numel(shape[1:]) * rows.element_size()
        data = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view, pos = memoryview(data), self._data_start + offset + start * row_bytes
        while view:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n
        done.append((start, stop))
        if sum(b - a for a, b in done) == shape[0]:
            self._written.add(name)
        return len(data)

    def close(self) -> None:
        missing = set(self._slots) - self._written
        os.close(self._fd)
        if missing:
            raise ValueError(f"{self.path.name}: {len(missing)} planned tensors never written, "
                             f"e.g. {sorted(missing)[:3]}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

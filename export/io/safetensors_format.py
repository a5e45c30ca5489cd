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
# Names safetensors writes for dtypes only newer torch builds have (FP8 checkpoints, unsigned ints):
# accepted where this torch can hold them, refused by name (not a crash) where it cannot.
_OPTIONAL_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
                    "F8_E5M2FNUZ": "float8_e5m2fnuz", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
ST_DTYPES.update({k: getattr(torch, v) for k, v in _OPTIONAL_DTYPES.items() if hasattr(torch, v)})
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float8_e4m3fn": torch.float8_e4m3fn}
MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
USIZE_MAX = 2**64 - 1  # shapes and offsets are u64 in the format; bigger JSON integers are not valid
METADATA = "__metadata__"


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
    """(tensors, metadata, data_start) of a safetensors file whose header passed `validate_header`.

    This is the one place a header is trusted: every reader (the checkpoint reader, convert's
    `pread` path, the TRT-LLM rank files) goes through it, so a file the `safetensors` library
    would refuse, or one whose offsets point two tensors at the same bytes, never reaches a copy.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError("file is truncated (no header)", path)
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"file is truncated or not safetensors (header of {n} bytes)", path)
        blob = f.read(n)
    infos, metadata = validate_header(blob, size - 8 - n, path)
    return infos, metadata, 8 + n


def validate_header(blob: bytes, data_len: int, path: object = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Check a header against the safetensors format rules; (tensors, metadata) or CheckpointError.

    The rules are the library's own (`Metadata::validate` in safetensors' tensor.rs): a JSON object
    in UTF-8; `__metadata__` a str -> str object; every other entry a known dtype, a shape of
    non-negative ints and two ordered data_offsets spanning exactly numel x itemsize bytes; and the
    entries, sorted by offset, tiling the data section from 0 to its last byte, with no overlap,
    gap or trailing bytes. Duplicate keys are refused too: two parsers could keep different copies.
    """
    header = _parse_json(blob, path)
    metadata = _metadata(header.pop(METADATA, None), path)
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, entry in header.items():
        try:
            infos[name] = _entry(name, entry)
        except ValueError as e:
            problems.append(f"tensor {name}: {e}")
    if not problems:
        problems = _tiling(infos, data_len)
    if problems:
        raise CheckpointError(problems, path)
    return infos, metadata


class _Duplicate(ValueError):
    """A key given twice: json keeps the last, another parser may keep the first."""


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's object hook, refusing duplicate keys instead of silently keeping the last."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(f"key {k!r} appears twice")
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    """NaN / Infinity: Python's json reads them, JSON (and the library) does not."""
    raise ValueError(f"{name} is not JSON")


def _parse_json(blob: bytes, path: object) -> dict[str, object]:
    """The header as a dict; strict JSON (no NaN, no duplicate keys), strict UTF-8 (no lone surrogates)."""
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_object, parse_constant=_no_constant)
    except _Duplicate as e:
        raise CheckpointError(f"header is ambiguous: {e}", path) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"header is not valid JSON ({e})", path) from None
    except RecursionError:
        raise CheckpointError("header is nested too deeply to be a safetensors header", path) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"header is a JSON {json_kind(header)}, not an object of tensors", path)
    bad = next((k for k in header if not _utf8(k)), None)
    if bad is not None:
        raise CheckpointError(f"header key {bad!r} is not valid UTF-8", path)
    return header


def _metadata(value: object, path: object) -> dict[str, str]:
    """`__metadata__`: absent or null (as the library allows), else an object of str -> str."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{METADATA} is a JSON {json_kind(value)}, not an object of strings", path)
    for k, v in value.items():
        if not _utf8(k):
            raise CheckpointError(f"{METADATA} key {k!r} is not valid UTF-8", path)
        if not isinstance(v, str) or not _utf8(v):
            raise CheckpointError(f"{METADATA}[{k!r}] is {json_kind(v)} {v!r:.40}, not a string", path)
    return value  # type: ignore[return-value]


def _entry(name: str, entry: object) -> TensorInfo:
    """One tensor's entry; ValueError says which field is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry is a JSON {json_kind(entry)}, not an object with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise ValueError(f"entry has no {' / '.join(missing)}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (known: {', '.join(ST_DTYPES)})")
    shape = _uints(entry["shape"], "shape")
    offsets = _uints(entry["data_offsets"], "data_offsets")
    if len(offsets) != 2:
        raise ValueError(f"data_offsets {entry['data_offsets']!r} must be exactly [begin, end]")
    begin, end = offsets
    if end < begin:
        raise ValueError(f"data_offsets [{begin}, {end}] end before they begin")
    nbytes = _numel(shape) * ST_DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise ValueError(f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape {list(shape)} "
                         f"of {dtype} needs {nbytes}")
    return TensorInfo(name, ST_DTYPES[dtype], shape, begin, end)


def _uints(value: object, field: str) -> tuple[int, ...]:
    """A JSON list of non-negative integers below 2**64 (bool is not an int here)."""
    if not isinstance(value, list):
        raise ValueError(f"{field} is {json_kind(value)} {value!r:.40}, not a list of integers")
    for v in value:
        if type(v) is not int or not 0 <= v <= USIZE_MAX:
            raise ValueError(f"{field} {value!r:.60} holds {v!r}, not a non-negative integer")
    if field == "shape":
        _numel(tuple(value))
    return tuple(value)


def _tiling(infos: dict[str, TensorInfo], data_len: int) -> list[str]:
    """Sorted by offsets, each tensor must start where the previous ended, and the last end the file.

    Otherwise two tensors share bytes (one silently takes another's weights), or bytes belong to no
    tensor. The library refuses both; so do we, naming the tensors involved.
    """
    pos, prev = 0, None
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin < pos:
            return [f"tensor {info.name}: data_offsets [{info.begin}, {info.end}] overlap tensor {prev.name} "
                    f"[{prev.begin}, {prev.end}]"]  # type: ignore[union-attr]
        if info.begin > pos:
            return [f"tensor {info.name}: data_offsets [{info.begin}, {info.end}] leave bytes [{pos}, "
                    f"{info.begin}) of the data section in no tensor"]
        if info.end > data_len:
            return [f"tensor {info.name}: data ends at byte {info.end} but the file holds {data_len} "
                    f"(file is truncated)"]
        pos, prev = info.end, info
    if pos != data_len:
        return [f"{data_len - pos} bytes after the last tensor's data (bytes [{pos}, {data_len})) "
                f"belong to no tensor"]
    return []


def json_kind(value: object) -> str:
    """How a JSON value reads in a message: object, list, string, null, ..."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _utf8(text: str) -> bool:
    """JSON's \\ud800 escapes give Python strings that are not UTF-8; the library refuses them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        self._rows: dict[str, list[tuple[int, int]]] = {}

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write a whole planned tensor."""
        self._slot(name)
        if name in self._rows:
            raise ValueError(f"tensor {name} written twice to {self.path.name}")
        dtype, shape, _, _ = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {shape} {dtype}")
        return self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, first_row: int, tensor: torch.Tensor) -> int:
        """Write rows [first_row, first_row + len(tensor)) of a planned tensor into its byte range.

        Lets a packed tensor (TRT-LLM's qkv) be filled from its parts without assembling it in memory.
        Rows may arrive in any order; overlaps are refused and `close()` checks every row arrived.
        """
        dtype, shape, offset, nbytes = self._slot(name)
        rows = shape[0] if shape else 1
        n = tensor.shape[0] if tensor.dim() else 1
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:] or not 0 <= first_row <= rows - n:
            raise ValueError(f"tensor {name}: rows [{first_row}, {first_row + n}) of {tuple(tensor.shape)} "
                             f"{tensor.dtype} do not fit planned {shape} {dtype}")
        done = self._rows.setdefault(name, [])
        if any(a < first_row + n and first_row < b for a, b in done):
            raise ValueError(f"tensor {name}: rows [{first_row}, {first_row + n}) written twice "
                             f"to {self.path.name}")
        done.append((first_row, first_row + n))
        row_bytes = nbytes // rows if rows else 0
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        pos = self._data_start + offset + first_row * row_bytes
        while view:
            k = os.pwrite(self._fd, view, pos)
            view, pos = view[k:], pos + k
        return len(data)

    def _slot(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if name not in self._slots:
            raise KeyError(f"tensor {name} was not planned for {self.path.name}")
        return self._slots[name]

    def close(self) -> None:
        os.close(self._fd)
        missing = [name for name, (_, shape, _, _) in self._slots.items()
                   if sum(b - a for a, b in self._rows.get(name, [])) != (shape[0] if shape else 1)]
        if missing:
            raise ValueError(f"{self.path.name}: {len(missing)} planned tensors never written (or only partly), "
                             f"e.g. {sorted(missing)[:3]}")


def _numel(shape: tuple[int, ...]) -> int:
    """Product of the dims; ValueError where a partial product leaves u64, as the library checks."""
    n = 1
    for d in shape:
        n *= d
        if n > USIZE_MAX:
            raise ValueError(f"shape {list(shape)} has more elements than a u64 holds")
    return n

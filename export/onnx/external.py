"""Weights as ONNX external data: one file, each tensor appended (page-aligned) as it is produced.

The graph only ever holds references (location, offset, length), so a tensor is converted,
written and dropped before the next is read: peak memory is one tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from onnx import TensorProto

ALIGN = 4096  # ORT memory-maps page-aligned external tensors instead of copying them
NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class ExternalData:
    """Appends tensors to `dir/name`; `add` returns the initializer that points at them."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.file = open(Path(directory) / name, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0

    def add(self, name: str, shape: tuple[int, ...], dtype: np.dtype, rows: Iterable[np.ndarray]) -> TensorProto:
        """Write `rows` (consecutive row blocks of a `shape` tensor, in order) and reference them."""
        pad = -self.offset % ALIGN
        self.file.write(b"\0" * pad)
        start = self.offset = self.offset + pad
        for block in rows:
            if block.dtype != dtype:
                raise ValueError(f"{name}: block dtype {block.dtype} is not {dtype}")
            self.file.write(np.ascontiguousarray(block).tobytes())
        length = self.file.tell() - start
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if length != expected:
            raise ValueError(f"{name}: wrote {length} bytes, shape {list(shape)} needs {expected}")
        self.offset = start + length
        proto = TensorProto(name=name, data_type=NP_TO_ONNX[np.dtype(dtype)], dims=list(shape))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(start)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def close(self) -> None:
        self.file.close()

"""Our safetensors header validator against the `safetensors` library, on seeded random corruptions.

`read_header` is the only gate before convert `pread`s bytes by offset, so it must refuse every
header the library refuses (else a file the library would never load gets converted, with some
tensor reading another's bytes), and it should accept what the library accepts, with the same
names, shapes and dtypes.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from export.errors import CheckpointError
from export.io.safetensors_format import ST_DTYPES, TORCH_TO_ST, read_header

N_CASES = 500
# Where we are stricter than the library, on purpose: dtypes this torch cannot hold, duplicate keys.
STRICTER = ("unsupported dtype", "header is ambiguous")
DTYPE_NAMES = [*ST_DTYPES, "F4", "f32", "FP32", "", "C64"]
ODD_VALUES: list[object] = [None, True, False, -1, 0, 1, 2.0, "1", [], {}, [1, 2, 3], 2**64, 2**64 - 1, -(2**63)]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[dict, bytes]:
    """(header, data) of a small file with several dtypes, a scalar and an empty tensor."""
    path = tmp_path_factory.mktemp("st") / "valid.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).bfloat16(),
               "ids": torch.arange(6).reshape(2, 3), "mask": torch.ones(5, dtype=torch.uint8),
               "s": torch.tensor(1.5), "empty": torch.zeros(0, 3), "w2": torch.randn(3, 4, generator=g)}
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(8, generator=g).to(torch.float8_e4m3fn)
    save_file(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


# ---- mutations: each edits (header, data) in place or returns replacements -------------------------
def _tensor(h: dict, rng: random.Random) -> str:
    return rng.choice(sorted(k for k in h if k != "__metadata__" and isinstance(h[k], dict)) or ["w"])


def _entry(h: dict, rng: random.Random) -> dict:
    e = h.get(_tensor(h, rng))
    return e if isinstance(e, dict) else {}


def m_offsets(h, d, rng):
    e = _entry(h, rng)
    b, end = (e.get("data_offsets") or [0, 0]) if isinstance(e.get("data_offsets"), list) else (0, 0)
    e["data_offsets"] = rng.choice([[b + 4, end + 4], [b - 4, end - 4], [end, b], [b, end + 4], [b, end - 4],
                                    [0, end - b], [b], [b, end, end], [str(b), end], [b, float(end)],
                                    [rng.randint(-8, 200), rng.randint(-8, 200)], rng.choice(ODD_VALUES)])


def m_shape(h, d, rng):
    e = _entry(h, rng)
    shape = e.get("shape") if isinstance(e.get("shape"), list) else []
    e["shape"] = rng.choice([[*shape, 1], [*shape, 2], shape[:-1], shape[::-1], [-1, *shape], [True] * len(shape),
                             [float(x) for x in shape if type(x) is int], [0], [], [2**64, 0], [2**40, 2**40, 0],
                             rng.choice(ODD_VALUES)])


def m_dtype(h, d, rng):
    _entry(h, rng)["dtype"] = rng.choice([*DTYPE_NAMES, *ODD_VALUES])


def m_drop_field(h, d, rng):
    _entry(h, rng).pop(rng.choice(["dtype", "shape", "data_offsets"]), None)


def m_extra_field(h, d, rng):
    _entry(h, rng)[rng.choice(["extra", "dtype2", "offsets"])] = rng.choice(ODD_VALUES)


def m_drop_tensor(h, d, rng):
    h.pop(_tensor(h, rng), None)


def m_alias(h, d, rng):
    """A new name for another tensor's bytes: overlap."""
    h[f"alias{rng.randint(0, 9)}"] = copy.deepcopy(_entry(h, rng))


def m_swap_offsets(h, d, rng):
    """Two tensors trade offsets: valid when they are the same size (w and w2), else not."""
    a, b = _tensor(h, rng), _tensor(h, rng)
    if isinstance(h[a], dict) and isinstance(h[b], dict) and "data_offsets" in h[a] and "data_offsets" in h[b]:
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


def m_entry_value(h, d, rng):
    h[_tensor(h, rng)] = rng.choice(ODD_VALUES)


def m_metadata(h, d, rng):
    h["__metadata__"] = rng.choice([None, {"format": 1}, {"format": None}, ["pt"], "pt", {}, {"a": "b", "c": "d"},
                                    {"format": {"nested": "x"}}])


def m_reorder(h, d, rng):
    items = list(h.items())
    rng.shuffle(items)
    h.clear()
    h.update(items)


def m_data(h, d, rng):
    k = rng.choice([-1, -4, 1, 4, 8])
    return None, (d[:k] if k < 0 else d + b"\0" * k)


def m_header(h, d, rng):
    return rng.choice([[], None, 3, "x", [h], True]), None


MUTATIONS: list[Callable] = [m_offsets, m_shape, m_dtype, m_drop_field, m_extra_field, m_drop_tensor, m_alias,
                             m_swap_offsets, m_entry_value, m_metadata, m_reorder, m_data, m_header]
RAW_TAILS = [b"\x00", b"x", b" \xff", b"}", b"\n"]  # after the JSON: only whitespace is allowed


def corrupted(valid: tuple[dict, bytes], rng: random.Random) -> bytes:
    """One seeded corruption of the valid file: 1-3 mutations, sometimes a raw tail on the header."""
    header, data = copy.deepcopy(valid[0]), valid[1]
    obj: object = header
    for _ in range(rng.randint(1, 3)):
        out = rng.choice(MUTATIONS)(header, data, rng)
        if out:
            obj = out[0] if out[0] is not None or out[1] is None else obj
            data = out[1] if out[1] is not None else data
    blob = json.dumps(obj).encode() + (rng.choice(RAW_TAILS) if rng.random() < 0.1 else b"")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def library_loads(path: Path) -> bool:
    try:
        load_file(path)
    except Exception:  # SafetensorError, or a dtype this torch cannot hold
        return False
    return True


def ours(path: Path) -> str | None:
    """None if we accept the file, else our error message."""
    try:
        read_header(path)
    except CheckpointError as e:
        return str(e)
    return None


def test_valid_file_reads_the_same_as_the_library(valid, tmp_path):
    path = tmp_path / "v.safetensors"
    header, data = valid
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    infos, metadata, _ = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(infos) == set(f.keys()) and metadata == f.metadata()
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(name)
            assert infos[name].shape == tuple(t.shape) and infos[name].dtype == t.dtype, name


def test_refuses_whatever_the_library_refuses(valid, tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "c.safetensors"
    refused = accepted = 0
    for i in range(N_CASES):
        path.write_bytes(corrupted(valid, rng))
        lib, msg = library_loads(path), ours(path)
        if not lib:
            assert msg is not None, f"case {i}: the library refuses it, we accept it: {path.read_bytes()[:400]!r}"
            assert "\n" not in msg or "problem(s)" in msg
            refused += 1
        elif msg is not None:
            assert any(s in msg for s in STRICTER), f"case {i}: the library accepts it, we refuse: {msg}"
        else:
            accepted += 1
            _same_as_library(path)
    assert refused > N_CASES // 2 and accepted > 10  # the mutations exercise both sides


def _same_as_library(path: Path) -> None:
    infos, _, _ = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(infos) == set(f.keys())
        for name in f.keys():  # noqa: SIM118
            sl = f.get_slice(name)
            assert list(infos[name].shape) == sl.get_shape()
            assert TORCH_TO_ST[infos[name].dtype] == sl.get_dtype()

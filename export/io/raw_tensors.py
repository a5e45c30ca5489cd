"""Row windows of a validated checkpoint by `pread`, hashed on the way: the converter's streaming read.

The weights-source format for a single pass over every tensor (`convert`): flat memory whatever
the model size, and the manifest's content hash for free. Random access (the runtime, verify,
fusion) reads memory-mapped slices through `CheckpointReader` instead.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from export.errors import CheckpointError
from export.io.reader import CheckpointReader


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
        """(fd, data_start) of a weight file, by the reader's validated header (offsets are trusted
        only because `read_header` checked they tile the file; the file must not have changed since)."""
        if fname not in self._files:
            path = self.reader.file_path(fname)
            data_start, size = self.reader.data_layout(fname)
            fd = os.open(path, os.O_RDONLY)
            if os.fstat(fd).st_size != size:
                os.close(fd)
                raise CheckpointError(f"changed since its header was checked ({size} bytes then, "
                                      f"{path.stat().st_size} now)", path)
            self._files[fname] = (fd, data_start)
            self._hash[fname] = (hashlib.sha256(os.pread(fd, data_start, 0)), 0)
        return self._files[fname]

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (valid until the second read after it, as every window)."""
        return self.read(name)

    def get_slice(self, name: str, first: int, stop: int) -> torch.Tensor:
        """Rows [first, stop) of tensor `name`."""
        return self.read(name, first, stop)

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

"""Starting the "torch" runtime (registry entry): this package's Decoder at the source's tp x pp.

A single rank runs in this process (measured faster under Triton than a worker process: no IPC per
step, and the model's ops release the GIL); more ranks run as worker processes (`backends.py`).
"""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError
from export.io.safetensors_format import torch_dtype
from export.layout import require_layout
from export.mapping import Mapping
from export.runtime.backends import Backend, LocalBackend, ProcessBackend
from export.runtime.model import load_decoder
from export.runtime.steps import Stepper
from export.sources import open_source
from export.spec import ModelSpec, normalize_dtype


def start_torch(source: Path, *, tp: int | None, pp: int | None, dtype: str, threads: int,
                python: str | None) -> tuple[ModelSpec, Mapping, Backend]:
    """tp/pp default to the source's own layout (a TRT-LLM checkpoint) or 1; a checkpoint split
    otherwise is refused."""
    dtype = normalize_dtype(dtype)
    spec, own, make = open_source(Path(source))
    mapping = Mapping(tp or (own.tp if own else 1), pp or (own.pp if own else 1))
    if own is not None and mapping != own:
        raise ExportError(f"{source}: checkpoint is split for tp={own.tp}, pp={own.pp}; "
                          f"cannot run it at tp={mapping.tp}, pp={mapping.pp}")
    require_layout(spec, mapping)
    if mapping.world_size == 1:
        backend: Backend = LocalBackend(Stepper(load_decoder(make(mapping, 0), dtype=torch_dtype(dtype))))
    else:
        backend = ProcessBackend(Path(source).absolute(), mapping, dtype, threads=threads, python=python)
    return spec, mapping, backend

"""The runtimes an `Engine` can run on, by name: one entry each, and every caller asks here.

The CLI (`--runtime`), `package` (the Triton engine model's `runtime` parameter), the benches and
`Engine.start` take the runtime as a name and look it up; none of them branches on a particular
one, so adding a runtime is one `RuntimeEntry` below. An entry names its start function as
"module:function" and it is imported only when that runtime starts: the runtime layer never imports
`export.onnx` (which imports this package) at module import time, and this module stays cheap
enough for argparse choices.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from export.errors import ExportError
from export.quantization import QUANT_ALGOS, Quantization, refusal

ALL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class OwnEngine:
    """An engine a runtime runs instead of the checkpoint's weights, written beside the checkpoint."""

    name: str    # its manifest `engines` key and its directory, engines/NAME/<name>
    label: str   # what messages call it
    build: str   # the `build` option that writes it


@dataclass(frozen=True)
class RuntimeEntry:
    """How to start one runtime, and what it can run."""

    name: str
    start: str                    # "module:function", called (source, *, tp, pp, dtype, threads, python)
                                  # -> (ModelSpec, Mapping, backends.Backend)
    help: str                     # one line for --runtime help
    parallel: bool = True         # tp/pp > 1 (else the whole model in one process)
    dtypes: tuple[str, ...] = ALL_DTYPES
    engine: OwnEngine | None = None  # what it runs beside the checkpoint (package requires and bundles it)
    quant_algos: tuple[str, ...] = QUANT_ALGOS  # the quantizations it runs (FP8 weights and KV cache, emulated)

    def load(self) -> Callable[..., tuple[Any, Any, Any]]:
        module, _, attr = self.start.partition(":")
        return getattr(importlib.import_module(module), attr)

    def runs(self, tp: int, pp: int) -> bool:
        """Whether this runtime can run at tp x pp."""
        return self.parallel or (tp, pp) == (1, 1)

    def runs_quant(self, quant: Quantization) -> bool:
        return all(algo is None or algo in self.quant_algos for algo in (quant.algo, quant.kv_cache))

    def require_quant(self, quant: Quantization, where: str) -> None:
        """Refuse, in one line, a checkpoint quantized in a way this runtime cannot run."""
        if not self.runs_quant(quant):
            raise ExportError(refusal(where, f"runtime {self.name!r}", quant))


RUNTIMES: dict[str, RuntimeEntry] = {}


def register(entry: RuntimeEntry) -> RuntimeEntry:
    if entry.name in RUNTIMES:
        raise ValueError(f"runtime {entry.name!r} is registered twice")
    RUNTIMES[entry.name] = entry
    return entry


def names() -> tuple[str, ...]:
    return tuple(RUNTIMES)


def describe() -> str:
    """The runtimes as one line of --runtime help."""
    return "; ".join(f"{e.name}: {e.help}" for e in RUNTIMES.values())


def preferred(tp: int, pp: int, dtype: str, has_engine: Callable[[OwnEngine], bool],
              quant: Quantization | None = None) -> str:
    """The runtime to serve when none is named: the first of `PREFERRED` that runs at tp x pp,
    `dtype` and `quant` and whose own engine, if it needs one, `has_engine` finds built."""
    for name in PREFERRED:
        entry = RUNTIMES[name]
        if (entry.runs(tp, pp) and dtype in entry.dtypes and (quant is None or entry.runs_quant(quant))
                and (entry.engine is None or has_engine(entry.engine))):
            return name
    return "torch"


def get(name: str) -> RuntimeEntry:
    """The entry for `name`, or the one-line refusal that lists the runtimes there are."""
    entry = RUNTIMES.get(name)
    if entry is None:
        raise ExportError(f"runtime must be one of {names()}, got {name!r}")
    return entry


register(RuntimeEntry("torch", "export.runtime.torch_runtime:start_torch",
                      "the reference Decoder in PyTorch (any tp x pp: worker processes beyond one rank)"))
register(RuntimeEntry("onnx", "export.onnx.backend:start_onnx",
                      "engines/NAME/onnx on ONNX Runtime (tp=1, fp32)",
                      parallel=False, dtypes=("float32",), engine=OwnEngine("onnx", "ONNX", "--onnx"), quant_algos=()))
register(RuntimeEntry("torch-fast", "export.runtime.fast:start_fast",
                      "the reference Decoder's weights with a low-overhead step: fused qkv/gate-up, "
                      "KV written in place (tp = pp = 1)", parallel=False, quant_algos=()))
register(RuntimeEntry("onnx-fast", "export.onnx.fast_backend:start_onnx_fast",
                      "engines/NAME/onnx's weights in ORT's fused graph (GroupQueryAttention over the KV cache "
                      "bound in place, SkipSimplifiedLayerNormalization; tp=1, fp32)",
                      parallel=False, dtypes=("float32",), engine=OwnEngine("onnx", "ONNX", "--onnx"), quant_algos=()))

# Fastest first, exact ones only (parity with "torch" <= 1e-4, greedy tokens identical): what `package`
# and the demo serve when no runtime is named. Measured in one interleaved `bench decode` run
# (docs/notes-decode-speed.md); "torch" runs everything (FP8 included, emulated), so it is last.
PREFERRED = ("onnx-fast", "torch")


def for_quant(quant: Quantization, chosen: str | None, where: str) -> RuntimeEntry:
    """The runtime for a checkpoint: `chosen` if it runs `quant` (else the one-line refusal), or
    when none was chosen the first registered one that does (torch for FP8)."""
    if chosen is not None:
        entry = get(chosen)
        entry.require_quant(quant, where)
        return entry
    return next(e for e in RUNTIMES.values() if e.runs_quant(quant))

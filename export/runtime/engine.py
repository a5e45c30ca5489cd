"""`Engine`: generation over the decoder, the same API in-process (tp = pp = 1) and over workers.

The driver owns scheduling and sampling; ranks only execute step commands (`steps.py`), so
the generation loop below is the one place to grow in-flight batching.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from export.errors import ExportError
from export.io.safetensors_format import torch_dtype
from export.layout import require_layout
from export.mapping import Mapping
from export.runtime.backends import LocalBackend, ProcessBackend
from export.runtime.model import load_decoder
from export.runtime.sampling import SamplingParams, make_generator, sample
from export.runtime.sources import open_source
from export.runtime.steps import Decode, Free, Logits, Prefill, Reserve, Stats, Stepper
from export.spec import ModelSpec, normalize_dtype

RUNTIMES = ("torch", "onnx")


class Engine:
    spec: ModelSpec
    mapping: Mapping

    def __init__(self, spec: ModelSpec, mapping: Mapping, backend: LocalBackend | ProcessBackend) -> None:
        self.spec, self.mapping, self.backend = spec, mapping, backend
        self.leader = mapping.rank(0, mapping.pp - 1)  # last stage, tp rank 0 returns logits
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the lock, to refuse re-entry instead of deadlocking

    @classmethod
    def start(cls, source: Path, *, tp: int | None = None, pp: int | None = None, dtype: str = "float32",
              threads: int = 1, python: str | None = None, runtime: str = "torch") -> Engine:
        """tp/pp default to the source's own layout (a TRT-LLM checkpoint) or 1.

        `threads`: torch threads per worker process (ORT intra-op threads for onnx); `python`: the
        worker interpreter (default sys.executable); `runtime`: "torch" (this package's Decoder) or
        "onnx" (the graph `build --onnx` wrote beside the checkpoint, run by ONNX Runtime; tp = pp = 1).
        """
        if runtime not in RUNTIMES:
            raise ExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "onnx":
            from export.onnx.backend import start_onnx

            spec, onnx_backend = start_onnx(Path(source), tp=tp, pp=pp, dtype=dtype, threads=threads)
            return cls(spec, Mapping(1, 1), onnx_backend)  # type: ignore[arg-type]
        dtype = normalize_dtype(dtype)
        spec, own, make = open_source(Path(source))
        mapping = Mapping(tp or (own.tp if own else 1), pp or (own.pp if own else 1))
        if own is not None and mapping != own:
            raise ExportError(f"{source}: checkpoint is split for tp={own.tp}, pp={own.pp}; "
                              f"cannot run it at tp={mapping.tp}, pp={mapping.pp}")
        require_layout(spec, mapping)
        if mapping.world_size == 1:
            backend: LocalBackend | ProcessBackend = LocalBackend(
                Stepper(load_decoder(make(mapping, 0), dtype=torch_dtype(dtype))))
        else:
            backend = ProcessBackend(Path(source).absolute(), mapping, dtype, threads=threads, python=python)
        return cls(spec, mapping, backend)

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One request at a time (the ranks run in lockstep); calling back into the engine while
        consuming its own `stream` is an error, not a deadlock."""
        if self._owner == threading.get_ident():
            raise ExportError("engine busy: this thread is still consuming a generation from it")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def _call(self, cmd: Any) -> Any:
        """Run a step on every rank; the leader's reply."""
        return self.backend.call(cmd)[self.leader]

    # ---- requests ----------------------------------------------------------------------------
    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        """[B, T, vocab] fp32 prefill logits, no cache; a right-padded (ragged) batch is fine."""
        self._check(input_ids, 0)
        with self._exclusive():
            return self._call(Logits(tuple(tuple(s) for s in input_ids)))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """New tokens only, per prompt."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self._steps(prompts, params):
            for row, tok in step:
                out[row].append(tok)
        return out

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[list[int]]:
        """New token ids as they are produced (one list per step)."""
        for step in self._steps([prompt], params):
            yield [tok for _, tok in step]

    def stats(self) -> list[dict[str, int]]:
        """Per rank: KV-cache bytes (held now, and per token) and collectives issued so far."""
        with self._exclusive():
            return self.backend.call(Stats())

    def kv_cache_bytes(self) -> int:
        return sum(s["kv_cache_bytes"] for s in self.stats())

    # ---- the generation loop -----------------------------------------------------------------
    def _check(self, prompts: list[list[int]], max_tokens: int) -> None:
        if not prompts:
            raise ExportError("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise ExportError(f"request {i}: empty prompt")
            bad = [t for t in p if not 0 <= t < self.spec.vocab]
            if bad:
                raise ExportError(f"request {i}: token id {bad[0]} outside the vocabulary [0, {self.spec.vocab})")
            if len(p) + max_tokens > self.spec.max_position_embeddings:
                raise ExportError(f"request {i}: {len(p)} prompt + {max_tokens} new tokens exceed "
                                  f"max_position_embeddings={self.spec.max_position_embeddings}")

    def _steps(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[tuple[int, int]]]:
        """Per step, the (row, token) pairs produced; finished rows leave the batch."""
        self._check(prompts, params.max_tokens)
        slots = tuple(range(len(prompts)))
        stop = set(params.stop_token_ids)
        gen = make_generator(params)
        with self._exclusive():
            self.backend.call(Reserve(len(prompts), max(map(len, prompts)) + params.max_tokens))
            self.backend.call(Free(slots))
            try:
                logits = self._call(Prefill(slots, tuple(tuple(p) for p in prompts)))
                active = list(slots)
                for step in range(params.max_tokens):
                    toks = sample(logits, params, gen)
                    yield list(zip(active, toks))
                    keep = [(r, t) for r, t in zip(active, toks) if t not in stop]
                    if step == params.max_tokens - 1 or not keep:
                        break
                    active = [r for r, _ in keep]
                    logits = self._call(Decode(tuple(active), tuple(t for _, t in keep)))
            finally:
                self.backend.call(Free(slots))

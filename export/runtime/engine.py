"""`Engine`: generation over the decoder, the same API in-process (tp = pp = 1) and over workers.

The driver owns scheduling and sampling; ranks only execute step commands (`steps.py`). Every
generation goes through the engine's `Scheduler` (in-flight batching): concurrent `stream`s and
`submit`s share decode steps, each with its own sampling settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from export.errors import ExportError
from export.io.safetensors_format import torch_dtype
from export.layout import require_layout
from export.mapping import Mapping
from export.runtime.backends import LocalBackend, ProcessBackend
from export.runtime.model import load_decoder
from export.runtime.sampling import SamplingParams
from export.runtime.scheduler import Handle, Scheduler
from export.runtime.steps import Logits, Stats, Stepper
from export.sources import open_source
from export.spec import ModelSpec, normalize_dtype

RUNTIMES = ("torch", "onnx")


class Engine:
    spec: ModelSpec
    mapping: Mapping

    def __init__(self, spec: ModelSpec, mapping: Mapping, backend: LocalBackend | ProcessBackend, *,
                 max_batch: int = 16, max_queue: int = 256, kv_cache_tokens: int | None = None) -> None:
        self.spec, self.mapping, self.backend = spec, mapping, backend
        self.leader = mapping.rank(0, mapping.pp - 1)  # last stage, tp rank 0 returns logits
        self._lock = threading.Lock()  # one step command at a time: the ranks run in lockstep
        self.scheduler = Scheduler(self._call, max_batch=max_batch, max_queue=max_queue,
                                   kv_cache_tokens=kv_cache_tokens, max_seq_len=spec.max_position_embeddings,
                                   check=lambda prompt, n: self._check([prompt], n))

    @classmethod
    def start(cls, source: Path, *, tp: int | None = None, pp: int | None = None, dtype: str = "float32",
              threads: int = 1, python: str | None = None, runtime: str = "torch", max_batch: int = 16,
              max_queue: int = 256, kv_cache_tokens: int | None = None) -> Engine:
        """tp/pp default to the source's own layout (a TRT-LLM checkpoint) or 1.

        `threads`: torch threads per worker process (ORT intra-op threads for onnx); `python`: the
        worker interpreter (default sys.executable); `runtime`: "torch" (this package's Decoder) or
        "onnx" (the graph `build --onnx` wrote beside the checkpoint, run by ONNX Runtime; tp = pp = 1).
        `max_batch` sequences run at once, `max_queue` more may wait, and running requests reserve at
        most `kv_cache_tokens` (prompt + max_tokens each; default max_batch x max_position_embeddings)
        -- see `export.runtime.scheduler`. A single torch rank runs in this process (measured faster
        under Triton than a worker process: no IPC per step, and the model's ops release the GIL).
        """
        if runtime not in RUNTIMES:
            raise ExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "onnx":
            from export.onnx.backend import start_onnx

            spec, onnx_backend = start_onnx(Path(source), tp=tp, pp=pp, dtype=dtype, threads=threads)
            return cls(spec, Mapping(1, 1), onnx_backend, max_batch=max_batch,  # type: ignore[arg-type]
                       max_queue=max_queue, kv_cache_tokens=kv_cache_tokens)
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
        return cls(spec, mapping, backend, max_batch=max_batch, max_queue=max_queue, kv_cache_tokens=kv_cache_tokens)

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self.scheduler.close()
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dead_ranks(self) -> list[tuple[int, int | None]]:
        """(rank, exit code) of every worker process that has exited; [] in-process.

        Cheap (a waitpid per rank) and lock-free, so a watchdog can ask while a step runs: a TP
        group with a dead rank cannot serve again, and whoever hosts the engine should say so."""
        return [(rank, p.returncode) for rank, p in enumerate(getattr(self.backend, "procs", []))
                if p.poll() is not None]

    def _call(self, cmd: Any) -> Any:
        """Run a step on every rank; the leader's reply. The scheduler's driver and `logits`/`stats`
        callers interleave whole commands."""
        with self._lock:
            try:
                return self.backend.call(cmd)[self.leader]
            except Exception as e:  # a broken collective is the symptom; a dead worker is the cause
                dead = self._await_dead_ranks()
                if dead:
                    rank, code = dead[0]
                    raise ExportError(f"engine is down: TP worker rank {rank} exited (code {code})") from e
                raise

    def _await_dead_ranks(self, wait_s: float = 0.5) -> list[tuple[int, int | None]]:
        """Dead workers, allowing a killed one the moment its exit takes to show (its peers can see
        the broken connection first)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = self.dead_ranks()
            if dead or not getattr(self.backend, "procs", None) or time.monotonic() > deadline:
                return dead
            time.sleep(0.02)

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        """Queue one request for in-flight batching; raises BusyError when the wait queue is full."""
        return self.scheduler.submit(prompt, params)

    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        """[B, T, vocab] fp32 prefill logits, no cache; a right-padded (ragged) batch is fine."""
        self._check(input_ids, 0)
        return self._call(Logits(tuple(tuple(s) for s in input_ids)))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """New tokens only, per prompt."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self._steps(prompts, params):
            for row, tok in step:
                out[row].append(tok)
        return out

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[list[int]]:
        """New token ids as they are produced (one list per step); closing the iterator cancels."""
        handle = self.submit(prompt, params)
        try:
            yield from handle
        finally:
            handle.cancel()

    def stats(self) -> list[dict[str, int]]:
        """Per rank: KV-cache bytes (held now, and per token) and collectives issued so far."""
        with self._lock:
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
        """Per step, the (row, token) pairs produced (the k-th token of every row still going);
        the prompts go to the scheduler together, so as a batch that fits they prefill and decode as one."""
        self._check(prompts, params.max_tokens)
        handles = self.scheduler.submit_many(prompts, params)
        try:
            live = list(enumerate(handles))
            while live:
                step = []
                for row, h in live:
                    out = h.poll()
                    if out is not None and out.tokens:
                        step += [(row, t) for t in out.tokens]
                live = [(row, h) for row, h in live if not h.finished]
                if step:
                    yield step
        finally:
            for h in handles:
                h.cancel()

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
from export.mapping import Mapping
from export.runtime import registry
from export.runtime.backends import Backend
from export.runtime.sampling import SamplingParams, length_problem
from export.runtime.scheduler import Handle, Scheduler
from export.runtime.steps import Logits, Stats
from export.spec import ModelSpec


class Engine:
    spec: ModelSpec
    mapping: Mapping

    def __init__(self, spec: ModelSpec, mapping: Mapping, backend: Backend, *,
                 max_batch: int = 16, max_queue: int = 256, kv_cache_tokens: int | None = None,
                 max_seq_len: int | None = None) -> None:
        self.spec, self.mapping, self.backend = spec, mapping, backend
        self.leader = mapping.leader  # last stage, tp rank 0 returns logits
        # The one request limit (prompt + max_tokens): the build's max_seq_len, as the Triton configs
        # and the manifest give it; the model's own context only when nobody gave one.
        self.max_seq_len, self.limit_name = ((max_seq_len, "max_seq_len") if max_seq_len else
                                             (spec.max_position_embeddings, "max_position_embeddings"))
        self._lock = threading.Lock()  # one step command at a time: the ranks run in lockstep
        self.scheduler = Scheduler(self._call, max_batch=max_batch, max_queue=max_queue,
                                   kv_cache_tokens=kv_cache_tokens, max_seq_len=self.max_seq_len, check=self._check)

    @classmethod
    def start(cls, source: Path, *, tp: int | None = None, pp: int | None = None, dtype: str = "float32",
              threads: int = 1, python: str | None = None, runtime: str = "torch", max_batch: int = 16,
              max_queue: int = 256, kv_cache_tokens: int | None = None, max_seq_len: int | None = None) -> Engine:
        """tp/pp default to the source's own layout (a TRT-LLM checkpoint) or 1.

        `threads`: torch threads per worker process (ORT intra-op threads for onnx); `python`: the
        worker interpreter (default sys.executable); `runtime`: a `registry.RUNTIMES` name -- "torch"
        (this package's Decoder) or "onnx" (the graph `build --onnx` wrote beside the checkpoint, run
        by ONNX Runtime; tp = pp = 1).
        `max_batch` sequences run at once, `max_queue` more may wait, and running requests reserve at
        most `kv_cache_tokens` (prompt + max_tokens each; default max_batch x max_seq_len) -- see
        `export.runtime.scheduler`. `max_seq_len` bounds prompt + max_tokens (default: the model's
        max_position_embeddings). Where the ranks run is the runtime's choice (`torch_runtime.py`).
        """
        from export.sources import load_spec

        entry = registry.get(runtime)
        if entry.quant_algos != registry.QUANT_ALGOS:  # one without FP8: refuse a quantized source first
            entry.require_quant(load_spec(source).quant, str(source))  # (config files only)
        spec, mapping, backend = entry.load()(Path(source), tp=tp, pp=pp, dtype=dtype, threads=threads, python=python)
        return cls(spec, mapping, backend, max_batch=max_batch, max_queue=max_queue, kv_cache_tokens=kv_cache_tokens,
                   max_seq_len=max_seq_len)

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
        self._check(input_ids, None)
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
    def _check(self, prompts: list[list[int]], params: SamplingParams | None) -> None:
        """What every request must satisfy (the scheduler asks on submit; `logits` passes no params):
        a non-empty prompt of vocabulary ids, and prompt + max_tokens within the one limit."""
        if not prompts:
            raise ExportError("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise ExportError(f"request {i}: empty prompt")
            bad = [t for t in p if not 0 <= t < self.spec.vocab]
            if bad:
                raise ExportError(f"request {i}: token id {bad[0]} outside the vocabulary [0, {self.spec.vocab})")
            problem = (params.length_problem(len(p), self.max_seq_len, self.limit_name) if params is not None
                       else length_problem(len(p), 0, self.max_seq_len, self.limit_name))
            if problem:
                raise ExportError(f"request {i}: {problem}")

    def _steps(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[tuple[int, int]]]:
        """Per step, the (row, token) pairs produced (the k-th token of every row still going);
        the prompts go to the scheduler together, so as a batch that fits they prefill and decode as one."""
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

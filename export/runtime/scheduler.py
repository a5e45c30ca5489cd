"""In-flight batching: requests join the running batch at the next step and leave when done.

One driver thread owns the ranks. Each iteration it frees the slots of cancelled and finished
requests, prefills the requests admitted since the last iteration (all in one `Prefill`), then runs
one `Decode` step for every running request, sampling each row with its own `SamplingParams` and
generator. It speaks only the step protocol (`Reserve`, `Prefill`, `Decode`, `Free` through one
`call(cmd) -> leader reply` function), so any backend that answers those commands (torch workers at
any TP/PP, or another runtime) batches the same way.

Admission needs a free slot (at most `max_batch` sequences run) and room under the KV cap (the
prompt plus max_tokens of every running request, in tokens); the rest wait, first come first
served. At most `max_queue` requests may wait (including those accepted but not yet admitted at
the next step); beyond that `submit` raises `BusyError` at once.

Faults stay with the request they belong to: a row whose logits cannot be sampled (or any other
error while handling one request's output) fails that request alone, and the batch goes on; a
batched prefill that fails is retried one request at a time, so only the request that fails alone
gets the error. Only a step that fails for the whole batch (a rank died) fails every request in it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from export.errors import ExportError
from export.runtime.sampling import SamplingError, SamplingParams, check_logits, make_generator, sample
from export.runtime.steps import Decode, Free, Prefill, Reserve

LEN_QUANTUM = 64  # the cache's length grows in steps of this many tokens, not one per decode step


class BusyError(ExportError):
    """The wait queue is full; the request was not accepted (retry later)."""


@dataclass(frozen=True)
class Output:
    """What one step produced for one request; `finished` is set on its last output."""

    tokens: list[int]
    finished: bool = False
    reason: str | None = None  # "length" | "stop" | "cancelled" once finished


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    gen: torch.Generator | None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False

    @property
    def kv_tokens(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    def finish_reason(self) -> str | None:
        """Why the token just generated ends this request, if it does."""
        last, p = self.generated[-1], self.params
        if last in p.stop_token_ids or any(
                len(s) <= len(self.generated) and tuple(self.generated[-len(s):]) == s for s in p.stop_sequences):
            return "stop"
        return "length" if len(self.generated) >= p.max_tokens else None


class Handle:
    """A submitted request: iterate for its token lists (one per step), `cancel()` to drop it."""

    def __init__(self, req: _Request, scheduler: Scheduler) -> None:
        self._req, self._sched = req, scheduler
        self.finished = False
        self.reason: str | None = None

    @property
    def id(self) -> int:
        return self._req.id

    def poll(self, timeout: float | None = None) -> Output | None:
        """The next step's output, or None if none came within `timeout`; raises the request's error."""
        if self.finished:
            return Output([], True, self.reason)
        try:
            item = self._req.out.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self.finished, self.reason = True, "error"
            raise item
        self.finished, self.reason = item.finished, item.reason
        return item

    def __iter__(self) -> Iterator[list[int]]:
        while not self.finished:
            out = self.poll()
            if out is not None and out.tokens:
                yield out.tokens

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the start of the driver's next step."""
        self._sched.cancel(self._req)


class Scheduler:
    """Continuous batching over step commands; thread-safe `submit`, one driver thread."""

    def __init__(self, call: Callable[[Any], Any], *, max_batch: int = 16, max_queue: int = 256,
                 kv_cache_tokens: int | None = None, max_seq_len: int = 2048,
                 check: Callable[[list[list[int]], SamplingParams], None] = lambda prompts, params: None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ExportError(f"scheduler: need max_batch >= 1 and max_queue >= 1 (got {max_batch}, {max_queue})")
        self.call, self.check = call, check
        self.max_batch, self.max_queue, self.max_seq_len = max_batch, max_queue, max_seq_len
        self.kv_cache_tokens = kv_cache_tokens or max_batch * max_seq_len
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._free_slots = list(range(max_batch))
        self._reserved = (0, 0)  # (slots, max_len) the ranks' caches hold
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # driver iterations run (prefill and/or decode), for tests and stats

    # ---- client side -------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        return self.submit_many([prompt], params)[0]

    def submit_many(self, prompts: list[list[int]], params: SamplingParams) -> list[Handle]:
        """Queue requests together (they are admitted in order, so a batch that fits prefills as one)."""
        self.check(prompts, params)
        for p in prompts:
            if len(p) + params.max_tokens > self.kv_cache_tokens:
                raise ExportError(f"request needs {len(p) + params.max_tokens} KV-cache tokens "
                                  f"({len(p)} prompt + {params.max_tokens} new), over the engine's cap of "
                                  f"{self.kv_cache_tokens}")
        with self._cv:
            if self._closed:
                raise ExportError("engine is closed")
            if len(self._waiting) + len(prompts) > self.max_queue:
                raise BusyError(f"engine busy: {len(self._running)} requests running and {len(self._waiting)} "
                                f"waiting (queue limit {self.max_queue}); retry later")
            reqs = [_Request(next(self._ids), list(p), params, make_generator(params)) for p in prompts]
            self._waiting.extend(reqs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return [Handle(r, self) for r in reqs]

    def cancel(self, req: _Request) -> None:
        with self._cv:
            if req.done:
                return
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, [], "cancelled")
            else:
                req.cancelled = True
                self._cv.notify_all()

    def load(self) -> dict[str, int]:
        """Requests running and waiting, and KV-cache tokens reserved by the running ones."""
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "kv_tokens": sum(r.kv_tokens for r in self._running), "steps": self.steps}

    def close(self, reason: str = "engine closed while the request was running") -> None:
        """Fail what is still queued or running (with `reason`), stop the driver."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._cv:
            for r in [*self._waiting, *self._running]:
                self._fail(r, ExportError(reason))
            self._waiting.clear()
            self._running.clear()

    # ---- the driver --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._running and not self._waiting:
                    self._cv.wait()
                if self._closed:
                    return
                leaving = [r for r in self._running if r.cancelled]
                admitted = self._admit()
            try:
                self._step(leaving, admitted)
            except Exception as e:  # a rank failed: every request in flight gets the error, the driver lives on
                self._abort(e)

    def _admit(self) -> list[_Request]:
        """Move waiting requests into free slots while they fit under the KV cap (FIFO; caller holds the lock)."""
        used = sum(r.kv_tokens for r in self._running if not r.cancelled)
        admitted: list[_Request] = []
        while self._waiting and self._free_slots and used + self._waiting[0].kv_tokens <= self.kv_cache_tokens:
            req = self._waiting.popleft()
            req.slot = heapq.heappop(self._free_slots)
            used += req.kv_tokens
            admitted.append(req)
        self._running += admitted
        return admitted

    def _step(self, leaving: list[_Request], admitted: list[_Request]) -> None:
        if leaving:
            self._release(leaving, "cancelled")
        decoding = [r for r in self._running if r not in admitted and not r.done]
        if admitted:
            self._reserve(admitted)
            self._prefill(admitted)
        if decoding:
            logits = self.call(Decode(tuple(r.slot for r in decoding), tuple(r.generated[-1] for r in decoding)))
            self._emit(decoding, logits)
        with self._cv:
            self.steps += 1
        ended = [r for r in self._running if r.done]
        if ended:
            self._release(ended, None)

    def _reserve(self, admitted: list[_Request]) -> None:
        """Grow the ranks' caches (never shrink) so every running request fits: slots x max length."""
        slots = max(self._reserved[0], max(r.slot for r in admitted) + 1)  # type: ignore[type-var]
        need = max(r.kv_tokens for r in self._running)
        max_len = max(self._reserved[1], min(-(-need // LEN_QUANTUM) * LEN_QUANTUM, self.max_seq_len), need)
        if (slots, max_len) != self._reserved:
            self.call(Reserve(slots, max_len))
            self._reserved = (slots, max_len)

    def _prefill(self, admitted: list[_Request]) -> None:
        """One batched prefill; if it fails, each request alone (the cache lengths of a failed
        prefill are untouched, and `Free` resets them anyway), so a request that cannot be
        prefilled fails by itself. A failure of every single prefill (a rank died) propagates."""
        try:
            self._emit(admitted, self.call(Prefill(tuple(r.slot for r in admitted),
                                                   tuple(tuple(r.prompt) for r in admitted))))
            return
        except Exception:
            if len(admitted) == 1:
                raise
        self.call(Free(tuple(r.slot for r in admitted)))  # type: ignore[arg-type]
        errors: list[Exception] = []
        for req in admitted:
            try:
                self._emit([req], self.call(Prefill((req.slot,), (tuple(req.prompt),))))  # type: ignore[arg-type]
            except Exception as e:
                errors.append(e)
                self._fail(req, _request_error(e))
        if len(errors) == len(admitted):
            raise errors[0]

    def _emit(self, reqs: list[_Request], logits: Any) -> None:
        """Sample each row with its own request's settings and hand the token over (a backend may
        answer with any array torch can wrap, e.g. numpy from another runtime). A row that fails
        fails its request only; it is freed with the finished ones at the end of the step."""
        logits = torch.as_tensor(logits)
        greedy = _greedy_tokens(logits, reqs)
        for row, req in enumerate(reqs):
            if req.cancelled or req.done:
                continue  # it leaves at the next step; nothing more reaches its consumer
            try:
                if greedy is not None and req.params.greedy:
                    tok = greedy[row]
                else:
                    tok = sample(logits[row:row + 1], req.params, req.gen)[0]
                req.generated.append(tok)
                reason = req.finish_reason()
            except Exception as e:  # this row's fault: the other rows of the batch go on
                self._fail(req, _request_error(e))
                continue
            if reason:
                req.done = True
            req.out.put(Output([tok], reason is not None, reason))

    def _release(self, reqs: list[_Request], reason: str | None) -> None:
        """Free these requests' slots on every rank and take them out of the batch."""
        self.call(Free(tuple(r.slot for r in reqs)))  # type: ignore[arg-type]
        with self._cv:
            for r in reqs:
                self._running.remove(r)
                heapq.heappush(self._free_slots, r.slot)  # type: ignore[arg-type]
                if reason:
                    self._finish(r, [], reason)
                r.done = True

    def _finish(self, req: _Request, tokens: list[int], reason: str) -> None:
        req.done = True
        req.out.put(Output(tokens, True, reason))

    def _fail(self, req: _Request, err: BaseException) -> None:
        if not req.done:
            req.done = True
            req.out.put(err)

    def _abort(self, err: Exception) -> None:
        """A step failed: fail the running requests, try to free their slots, keep serving the queue."""
        with self._cv:
            failed, self._running = self._running, []
            for r in failed:
                self._fail(r, err if isinstance(err, ExportError) else ExportError(f"engine step failed: {err}"))
                heapq.heappush(self._free_slots, r.slot)  # type: ignore[arg-type]
        if failed:
            with contextlib.suppress(Exception):
                self.call(Free(tuple(r.slot for r in failed)))  # type: ignore[arg-type]


def _greedy_tokens(logits: torch.Tensor, reqs: list[_Request]) -> list[int] | None:
    """Every row's argmax in one call when some rows are greedy and every row's logits are sound:
    the tokens `sample` gives row by row, without its ~40 us of checks per row (16 rows: ~0.6 ms a
    step). None when a row is unsound: then each row goes through `sample`, which fails that one."""
    if not any(r.params.greedy for r in reqs):
        return None
    try:
        check_logits(logits)
    except SamplingError:
        return None
    return logits.argmax(-1).tolist()


def _request_error(e: Exception) -> ExportError:
    """The error one request ends with, naming what failed for it."""
    return e if isinstance(e, ExportError) else ExportError(f"request failed: {type(e).__name__}: {e}")

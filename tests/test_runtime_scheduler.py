"""In-flight batching: joining a running batch, per-request settings, queue limit, KV cap, cancellation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from export.errors import ExportError
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingError, SamplingParams, check_logits
from export.runtime.scheduler import BusyError
from export.synthetic import write_random_checkpoint
from tests.conftest import hetero_spec

PROMPTS = [[4, 9, 16, 25, 36], [7, 7], [90, 80, 70, 60, 50, 40, 30], [11]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sched") / "ckpt", hetero_spec(), seed=8, std=0.1)


@pytest.fixture(scope="module")
def eng(ckpt):
    with Engine.start(ckpt) as e:
        yield e


def alone(eng: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return eng.generate([prompt], params)[0]


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_late_requests_join_the_running_batch_with_their_own_settings(eng):
    settings = [SamplingParams(max_tokens=24),
                SamplingParams(max_tokens=9, temperature=1.3, seed=5),
                SamplingParams(max_tokens=16, temperature=0.9, top_k=7, top_p=0.8, seed=6),
                SamplingParams(max_tokens=5)]
    want = [alone(eng, p, s) for p, s in zip(PROMPTS, settings)]
    steps0 = eng.scheduler.steps
    first = eng.submit(PROMPTS[0], settings[0])
    got = [list(first.poll().tokens)]  # A is decoding ...
    rest = [eng.submit(p, s) for p, s in zip(PROMPTS[1:], settings[1:])]  # ... when the others arrive
    got[0] += [t for step in first for t in step]
    got += [[t for step in h for t in step] for h in rest]
    assert got == want
    # they shared steps: fewer driver iterations than the four requests' tokens one after another
    assert eng.scheduler.steps - steps0 < sum(map(len, want)) - 10
    wait_for(lambda: eng.scheduler.load()["running"] == 0)  # the last one's slot is freed after its output


def test_stop_tokens_and_stop_sequences_end_only_their_request(eng):
    ref = alone(eng, PROMPTS[0], SamplingParams(max_tokens=12))
    stop_tok = SamplingParams(max_tokens=12, stop_token_ids=(ref[4],))
    stop_seq = SamplingParams(max_tokens=12, stop_sequences=((ref[6], ref[7]), (999,)))
    handles = [eng.submit(PROMPTS[0], p) for p in (stop_tok, stop_seq, SamplingParams(max_tokens=12))]
    outs = [[t for step in h for t in step] for h in handles]
    assert outs[0] == ref[:ref.index(ref[4]) + 1] and handles[0].reason == "stop"
    assert outs[1] == ref[:8] and handles[1].reason == "stop"
    assert outs[2] == ref and handles[2].reason == "length"


def test_full_queue_is_busy_and_kv_cap_makes_requests_wait(ckpt):
    with Engine.start(ckpt, max_batch=2, max_queue=1, kv_cache_tokens=40) as e:
        with pytest.raises(ExportError, match="over the engine's cap of 40"):
            e.submit([1] * 30, SamplingParams(max_tokens=11))
        long = SamplingParams(max_tokens=30)
        a = e.submit([1, 2, 3], long)  # 33 KV tokens: the next one does not fit beside it
        a.poll()
        b = e.submit([4, 5, 6], SamplingParams(max_tokens=5))
        with pytest.raises(BusyError, match=r"engine busy: .*queue limit 1"):
            e.submit([7], SamplingParams(max_tokens=2))
        assert e.scheduler.load()["waiting"] == 1 and e.scheduler.load()["running"] == 1
        assert len([t for s in a for t in s]) == 29  # one came from the poll above
        assert [t for s in b for t in s] == alone(e, [4, 5, 6], SamplingParams(max_tokens=5))


def test_cancel_frees_the_slot_within_one_step(eng):
    h = eng.submit(PROMPTS[1], SamplingParams(max_tokens=200))
    h.poll()
    steps = eng.scheduler.steps
    h.cancel()
    wait_for(lambda: eng.scheduler.load()["running"] == 0)
    assert eng.scheduler.steps - steps <= 2  # the step in flight, then the slot is freed
    while not h.finished:
        h.poll()
    assert h.reason == "cancelled"
    # closing a stream early cancels too
    stream = eng.stream(PROMPTS[0], SamplingParams(max_tokens=200))
    next(stream)
    stream.close()
    wait_for(lambda: eng.scheduler.load()["running"] == 0)
    assert alone(eng, PROMPTS[3], SamplingParams(max_tokens=3)) == alone(eng, PROMPTS[3], SamplingParams(max_tokens=3))


@pytest.mark.slow
def test_tp2_concurrent_streams_equal_the_single_request_runs(ckpt, eng):
    params = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=7, temperature=1.1, seed=3),
              SamplingParams(max_tokens=12), SamplingParams(max_tokens=4, top_k=5, temperature=0.7, seed=4)]
    want = [alone(eng, p, s) for p, s in zip(PROMPTS, params)]
    got: list[list[int] | None] = [None] * len(PROMPTS)
    with Engine.start(ckpt, tp=2) as e:
        def run(i: int) -> None:
            got[i] = [t for step in e.stream(PROMPTS[i], params[i]) for t in step]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        wait_for(lambda: e.scheduler.load()["running"] == 0)
    assert got == want


# ---- per-request fault isolation -------------------------------------------------------------
BATCH = [[3 + i, 17, 40 + 5 * i, 8][: 1 + i % 4] for i in range(8)]
POISON = 5  # the row (request) the injected faults hit


class Inject:
    """A real engine's step function with one fault added: the request whose prompt is `prompt`
    gets NaN logits from its `after`-th output on (0 = its prefill), or its prefill raises."""

    def __init__(self, call, prompt: list[int], after: int = 0, raise_in_prefill: bool = False) -> None:
        self.call, self.prompt, self.after, self.raise_in_prefill = call, tuple(prompt), after, raise_in_prefill
        self.slot: int | None = None
        self.outputs = 0

    def __call__(self, cmd):
        from export.runtime.steps import Decode, Prefill

        if isinstance(cmd, Prefill) and self.prompt in cmd.seqs:
            if self.raise_in_prefill:
                raise RuntimeError("index out of range in self")  # what an out-of-range embedding raises
            self.slot = cmd.slots[cmd.seqs.index(self.prompt)]
        logits = self.call(cmd)
        slots = cmd.slots if isinstance(cmd, Prefill | Decode) else ()
        if self.slot in slots and (isinstance(cmd, Decode) or self.prompt in cmd.seqs):
            if self.outputs >= self.after:
                logits = logits.clone()
                logits[slots.index(self.slot)] = float("nan")
            self.outputs += 1
        return logits


def run_batch(eng: Engine, inject: Inject, params: SamplingParams) -> tuple[list[list[int]], list[str | None]]:
    """The 8 prompts submitted together (one batch) through `inject`; tokens and error text per request."""
    real = eng.scheduler.call
    eng.scheduler.call = inject
    try:
        handles = eng.scheduler.submit_many(BATCH, params)
        outs, errors = [], []
        for h in handles:
            toks: list[int] = []
            err = None
            try:
                for step in h:
                    toks += step
            except ExportError as e:
                err = str(e)
            outs.append(toks)
            errors.append(err)
        wait_for(lambda: eng.scheduler.load()["running"] == 0)
    finally:
        eng.scheduler.call = real
    return outs, errors


@pytest.mark.parametrize("fault", ["nan at prefill", "nan mid-decode", "prefill raises"])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_failing_row_fails_only_its_request(eng, fault, sampled):
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=11) if sampled else SamplingParams(max_tokens=10)
    want = [alone(eng, p, params) for p in BATCH]
    inject = Inject(eng.scheduler.call, BATCH[POISON], after=0 if fault == "nan at prefill" else 4,
                    raise_in_prefill=fault == "prefill raises")
    outs, errors = run_batch(eng, inject, params)
    others = [i for i in range(len(BATCH)) if i != POISON]
    assert [outs[i] for i in others] == [want[i] for i in others]  # the other 7 finish with the reference
    assert all(errors[i] is None for i in others)
    expected = "index out of range" if fault == "prefill raises" else "non-finite logits"
    assert errors[POISON] is not None and expected in errors[POISON]
    if fault == "nan mid-decode":
        assert outs[POISON] == want[POISON][:4]  # its tokens before the fault, then the error
    # the engine is healthy afterwards: every slot free, the next batch is exact
    assert eng.scheduler.load()["running"] == 0
    assert alone(eng, BATCH[POISON], params) == want[POISON]


@pytest.mark.parametrize("tiny", [1e-38, 1e-44])
def test_tiny_temperature_is_greedy_and_harms_nobody(eng, tiny):
    """A tiny temperature used to make logits / T overflow to inf, and the NaN failed the whole batch."""
    greedy = SamplingParams(max_tokens=8)
    want = [alone(eng, p, greedy) for p in PROMPTS]
    handles = [eng.submit(p, SamplingParams(max_tokens=8, temperature=tiny if i == 1 else 0.0))
               for i, p in enumerate(PROMPTS)]
    assert [[t for s in h for t in s] for h in handles] == want


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(top_p=float("nan"))])
def test_non_finite_sampling_settings_are_refused(bad):
    with pytest.raises(ExportError, match="bad sampling parameters"):
        SamplingParams(**bad)


@pytest.mark.parametrize("value, ok", [(float("nan"), False), (float("inf"), False), (float("-inf"), True),
                                       (3e38, True)])
def test_check_logits_one_element(value: float, ok: bool) -> None:
    """The one-reduction fast path (a finite sum) never lets a bad row through and never refuses a
    sound one: -inf is a masked token, and finite logits whose sum overflows take the exact check."""
    logits = torch.zeros(3, 64)
    logits[1, 5] = value
    logits[1, 6] = value
    if ok:
        check_logits(logits)
    else:
        with pytest.raises(SamplingError, match="row 1"):
            check_logits(logits)


def test_check_logits_row_with_nothing_finite() -> None:
    logits = torch.zeros(2, 8)
    logits[0] = float("-inf")
    with pytest.raises(SamplingError, match="row 0"):
        check_logits(logits)

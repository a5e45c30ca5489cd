"""Tensor and pipeline parallelism over real worker processes (gloo): same logits as tp = 1."""

from __future__ import annotations

import pytest
import torch

from export.errors import ExportError
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingParams
from export.synthetic import write_random_checkpoint
from tests.conftest import hetero_spec

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 64, 12], [3, 8, 1, 77], [60, 61, 62, 63, 64, 65]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The hetero checkpoint and what tp = 1 makes of it (logits, greedy and seeded samples)."""
    path = write_random_checkpoint(tmp_path_factory.mktemp("tp") / "ckpt", hetero_spec(), seed=4, std=0.1)
    with Engine.start(path) as eng:
        assert eng.mapping.world_size == 1
        ref = {"logits": eng.logits(PROMPTS),
               "greedy": eng.generate(PROMPTS, SamplingParams(max_tokens=6)),
               "sampled": eng.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.8, top_k=40,
                                                               top_p=0.95, seed=7))}
    return path, ref


def _same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape == (3, 9, 99)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_tp2_matches_tp1(reference):
    path, ref = reference
    spec = hetero_spec()
    with Engine.start(path, tp=2) as eng:
        before = eng.stats()
        _same_logits(eng.logits(PROMPTS), ref["logits"])
        # what the ranks issue is what the spec reports: one per attention / FFN sublayer + the lm_head gather
        assert [a["tp_collectives"] - b["tp_collectives"] for a, b in zip(eng.stats(), before)] == \
            [spec.sync_points_per_token()] * 2
        assert eng.generate(PROMPTS, SamplingParams(max_tokens=6)) == ref["greedy"]
        assert eng.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.8, top_k=40, top_p=0.95,
                                                    seed=7)) == ref["sampled"]
        stats = eng.stats()
    # both ranks hold cache for the 3 attention layers only; layer 5 has 1 kv head, duplicated on both ranks
    per_rank = 2 * (1 + 2 + 1) * spec.head_dim * 4
    assert [s["kv_bytes_per_token"] for s in stats] == [per_rank, per_rank]


@pytest.mark.slow
def test_tp4_matches_tp1(reference):
    path, ref = reference
    with Engine.start(path, tp=4) as eng:
        _same_logits(eng.logits(PROMPTS), ref["logits"])


@pytest.mark.slow
def test_tp2_pp2_matches_tp1(reference):
    path, ref = reference
    with Engine.start(path, tp=2, pp=2) as eng:
        _same_logits(eng.logits(PROMPTS), ref["logits"])
        assert eng.generate(PROMPTS, SamplingParams(max_tokens=6)) == ref["greedy"]
        stream = list(eng.stream(PROMPTS[1], SamplingParams(max_tokens=6)))
    assert stream == [[t] for t in ref["greedy"][1]]


@pytest.mark.slow
def test_uneven_pp3_with_an_attention_free_stage_matches_tp1(reference):
    """8 layers at pp 3: TRT-LLM's split gives 3, 3, 2 layers; the last stage (linear + empty layers)
    has no KV cache at all. trtllm-build refuses such a stage, the cpu engine runs it."""
    path, ref = reference
    with Engine.start(path, pp=3) as eng:
        _same_logits(eng.logits(PROMPTS), ref["logits"])
        assert eng.generate(PROMPTS, SamplingParams(max_tokens=6)) == ref["greedy"]
        stats = eng.stats()
    hd = hetero_spec().head_dim
    assert [s["kv_bytes_per_token"] for s in stats] == [2 * (2 + 4) * hd * 4, 2 * 1 * hd * 4, 0]


def test_impossible_layout_is_refused_before_starting(reference):
    path, _ = reference
    with pytest.raises(ExportError, match="tp=3"):
        Engine.start(path, tp=3)


DRIVER = """
import os, sys, time
from export.runtime.engine import Engine
eng = Engine.start(sys.argv[1], tp=2)
print(" ".join(str(p.pid) for p in eng.backend.procs), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_workers_die_with_their_driver(reference, tmp_path):
    """A driver killed outright (no close, no atexit) leaves no worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    path, _ = reference
    repo = Path(__file__).resolve().parents[1]
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path)], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 20
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    assert os.getpid()  # the test process itself is untouched


def _alive(pid: int) -> bool:
    from pathlib import Path
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"

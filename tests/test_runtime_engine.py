"""The in-process engine and sampling: stop tokens, seeds, filters, bad requests."""

from __future__ import annotations

import pytest
import torch

from export.errors import ExportError
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingParams, filter_logits
from export.synthetic import write_random_checkpoint
from tests.conftest import hetero_spec


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("eng") / "ckpt", hetero_spec(), seed=8, std=0.1)
    with Engine.start(path) as e:
        yield e


def test_filters_keep_exactly_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False, False]]
    # 0.5 + 0.2 < 0.8, so the third token is still needed; the fourth is not
    assert torch.isfinite(filter_logits(logits, 0, 0.8)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.01)).tolist() == [[True, False, False, False, False]]


def test_batch_generation_equals_one_by_one_and_stops(eng):
    prompts = [[4, 9, 16, 25, 36], [7, 7], [90, 80, 70]]
    greedy = SamplingParams(max_tokens=7)
    batch = eng.generate(prompts, greedy)
    assert batch == [eng.generate([p], greedy)[0] for p in prompts]
    assert all(len(out) == 7 for out in batch)
    stop = batch[0][2]
    stopped = eng.generate(prompts[:1], SamplingParams(max_tokens=7, stop_token_ids=(stop,)))[0]
    assert stopped == batch[0][:batch[0].index(stop) + 1]


def test_seeded_sampling_reproduces_and_varies(eng):
    p = SamplingParams(max_tokens=12, temperature=1.5, seed=11)
    a, b = eng.generate([[3, 4, 5]], p), eng.generate([[3, 4, 5]], p)
    c = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=12, temperature=1.5, seed=12))
    assert a == b and a != c


def test_kv_cache_bytes_cover_attention_layers_only(eng):
    eng.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=4))
    (stats,) = eng.stats()
    assert stats["kv_bytes_per_token"] == hetero_spec().kv_cache_bytes_per_token("float32")
    assert eng.kv_cache_bytes() >= 2 * 7 * stats["kv_bytes_per_token"]


def test_bad_requests_name_the_request(eng):
    with pytest.raises(ExportError, match="request 1: empty prompt"):
        eng.generate([[1], []], SamplingParams())
    with pytest.raises(ExportError, match="request 0: token id 99"):
        eng.logits([[1, 99]])
    with pytest.raises(ExportError, match="max_position_embeddings"):
        eng.generate([[1] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(ExportError, match="top_p"):
        SamplingParams(top_p=0.0)
    stream = eng.stream([1, 2], SamplingParams(max_tokens=3))
    next(stream)
    assert eng.logits([[1, 2]]).shape == (1, 2, 99)  # runs between the stream's steps, no deadlock
    assert len(list(stream)) == 2

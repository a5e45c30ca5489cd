"""One layer resident at a time (`runtime.layerwise`, what `quantize` calibrates with) computes and
observes exactly what the whole model does."""

from __future__ import annotations

import pytest
import torch
from conftest import hetero_spec
from test_puzzletron import checkpoint, parallel_config

from export.mapping import Mapping
from export.quantize.calibrate import Amaxes
from export.runtime.layerwise import run_layerwise
from export.runtime.model import load_decoder
from export.sources import open_source
from export.synthetic import write_random_checkpoint


@pytest.fixture(params=["hetero", "tied", "parallel_blocks"])
def source(request, tmp_path):
    if request.param == "parallel_blocks":
        return checkpoint(tmp_path, parallel_config(with_attention=True))
    spec = hetero_spec()
    if request.param == "tied":
        from dataclasses import replace
        spec = replace(spec, tie_embeddings=True)
    return write_random_checkpoint(tmp_path / "ckpt", spec)


def test_layerwise_logits_and_observations_equal_the_whole_model(source):
    src = open_source(source)
    ids = torch.randint(0, src.spec.vocab, (6, 10), generator=torch.Generator().manual_seed(1))
    whole = load_decoder(src.rank_weights(Mapping(1, 1), 0))
    want = Amaxes(tokens=ids.numel())
    whole.observe = want.record  # the whole model resident, observed over the same batches
    with torch.no_grad():
        want_logits = [whole(b) for b in ids.split(4)]
    got = Amaxes(tokens=ids.numel())
    logits = run_layerwise(src.rank_weights(Mapping(1, 1), 0), list(ids.split(4)), observe=got.record,
                           head=True, progress=False)
    assert got.inputs == want.inputs and got.kv == want.kv and got.inputs
    for a, b in zip(logits, want_logits, strict=True):
        assert torch.equal(a, b)


def test_without_head_the_lm_head_is_never_read(source):
    src = open_source(source)
    seen: set = set()
    run_layerwise(src.rank_weights(Mapping(1, 1), 0), [torch.zeros(1, 3, dtype=torch.long)],
                  observe=lambda key, x: seen.add(key), progress=False)
    assert seen and not any(isinstance(k, tuple) and k[0] == "lm_head" for k in seen)

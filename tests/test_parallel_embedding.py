"""Vocab-parallel embedding (TRT-LLM's use_parallel_embedding): split rules, rank files, config,
dry-run/inspect bytes, and verify running the split lookup in real gloo processes."""

from __future__ import annotations

import json

import pytest
import torch

from export.checks.verify import verify
from export.cli import main
from export.errors import ExportError
from export.layout import rank_bytes
from export.mapping import Mapping
from export.sharding import padded_vocab, shard_for, take
from export.tensors import Role, TensorRef
from export.trtllm.config import parse_trtllm_config, trtllm_config
from export.trtllm.convert import convert
from export.trtllm.dryrun import dry_run
from export.trtllm.rank_layout import check_complete, plan_checkpoint
from tests.conftest import hetero_spec
from tests.oracles import expected_shapes
from tests.trtllm_helpers import make_source, rank_tensors, read_all

EMB = "transformer.vocab_embedding.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.set_num_threads(1)
    # vocab 99: divisible by neither 2 nor 4, so the last rank's rows are zero-padded
    return make_source(tmp_path_factory.mktemp("pe") / "src", hetero_spec(), seed=7)


@pytest.mark.parametrize("tp", [2, 3, 4, 8])
def test_vocab_rows_are_ceil_and_padded_with_zeros(tp):
    spec = hetero_spec()
    ref = TensorRef(Role.EMBED, None, (spec.vocab, spec.hidden))
    full = torch.randn(ref.shape)
    pieces = [take(full, shard_for(spec, ref, r, tp, 0), ref.shape) for r in range(tp)]
    assert {p.shape[0] for p in pieces} == {-(-spec.vocab // tp)}  # TRT-LLM Embedding: ceil(V / tp) rows
    back = torch.cat(pieces)
    assert back.shape[0] == padded_vocab(spec.vocab, tp)
    assert torch.equal(back[:spec.vocab], full) and not back[spec.vocab:].any()
    cols = [take(full, shard_for(spec, ref, r, tp, 1), ref.shape) for r in range(tp) if spec.hidden % tp == 0]
    if cols:
        assert torch.equal(torch.cat(cols, dim=1), full)


def test_whole_by_default_and_at_tp1():
    spec = hetero_spec()
    ref = TensorRef(Role.EMBED, None, (spec.vocab, spec.hidden))
    assert shard_for(spec, ref, 1, 4).dim is None and shard_for(spec, ref, 0, 1, 0).dim is None


@pytest.mark.parametrize("tp,pp,dim", [(2, 1, 0), (4, 1, 0), (2, 2, 0), (2, 1, 1)])
def test_plan_complete_and_shapes(tp, pp, dim):
    spec, m = hetero_spec(), Mapping(tp, pp, embedding_shard=dim)
    plans = plan_checkpoint(spec, m)
    assert check_complete(spec, m, plans) == []
    for plan in plans:
        assert plan.tensors == expected_shapes(spec, m, plan.rank)


def test_config_round_trip_and_equality():
    spec = hetero_spec()
    cfg = trtllm_config(spec, Mapping(4, 1, embedding_shard=1), "float32")
    assert (cfg["use_parallel_embedding"], cfg["embedding_sharding_dim"]) == (True, 1)
    _, m = parse_trtllm_config(cfg)
    assert m.embedding_shard == 1 and m == Mapping(4, 1)  # equality is the process layout only
    assert trtllm_config(spec, Mapping(4, 1), "float32")["use_parallel_embedding"] is False
    # at tp 1 there is nothing to split: written as TRT-LLM's default
    assert trtllm_config(spec, Mapping(1, 2, embedding_shard=0), "float32")["use_parallel_embedding"] is False


def test_dim1_needs_tp_to_divide_hidden():
    from dataclasses import replace
    with pytest.raises(ExportError, match="does not divide hidden_size=68 \\(embedding sharding dim 1\\)"):
        dry_run(replace(hetero_spec(), hidden=68), Mapping(8, 1, embedding_shard=1))
    with pytest.raises(ExportError, match="0 \\(vocab\\) or 1 \\(hidden\\)"):
        Mapping(2, 1, embedding_shard=2)


def test_dry_run_and_inspect_show_the_saving():
    spec = hetero_spec()
    whole, split = dry_run(spec, Mapping(4)), dry_run(spec, Mapping(4, embedding_shard=0))
    saved = (spec.vocab - padded_vocab(spec.vocab, 4) // 4) * spec.hidden * 4
    for a, b in zip(whole["ranks"], split["ranks"], strict=True):
        assert a["bytes"] - b["bytes"] == saved and b["bytes"] == b["inspect_bytes"]
        assert b["bytes"] == rank_bytes(spec, Mapping(4, embedding_shard=0), b["rank"])
    assert split["rank_bytes_saved"] == saved and whole["rank_bytes_saved"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dim", [(2, 1, 0), (4, 1, 0), (2, 2, 0), (2, 1, 1)])
def test_convert_round_trips_through_verify(source, tmp_path, tp, pp, dim):
    eng = convert(source, tmp_path / "e", tp=tp, pp=pp, progress=False, embedding_shard=dim).out
    ckpt = eng / "checkpoint"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert (cfg["use_parallel_embedding"], cfg["embedding_sharding_dim"]) == (True, dim)
    emb = read_all(source)["model.embed_tokens.weight"]
    parts = [rank_tensors(ckpt, r)[EMB] for r in range(tp)]  # the first stage's tp ranks
    back = torch.cat(parts, dim=dim)
    assert torch.equal(back[:spec_vocab()], emb) and not back[spec_vocab():].any()
    assert all(EMB not in rank_tensors(ckpt, r) for r in range(tp, tp * pp))  # first stage only
    res = verify(eng, source)  # the runtime's split lookup + collective, in tp*pp gloo processes
    assert res.passed and res.lossless and res.max_abs_diff <= 1e-4, res.summary()


def spec_vocab() -> int:
    return hetero_spec().vocab


def test_cli_flags(source, tmp_path, capsys):
    assert main(["convert", "--dry-run", str(source / "config.json"), "--tp", "4", "--summary",
                 "--parallel-embedding"]) == 0
    out = capsys.readouterr().out
    assert "match `inspect`" in out and "parallel embedding (sharding dim 0): the largest rank file is" in out
    out = tmp_path / "e"
    assert main(["convert", str(source), "--tp", "2", "--parallel-embedding", "--embedding-sharding-dim", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "checkpoint" / "config.json").read_text())["embedding_sharding_dim"] == 1


@pytest.mark.slow
def test_runtime_issues_one_more_collective_per_forward(source, tmp_path):
    """What the ranks issue is what `layout.sync_points_per_token` reports: + 1 at the lookup."""
    from export.layout import sync_points_per_token
    from export.runtime.engine import Engine

    eng_dir = convert(source, tmp_path / "e", tp=2, progress=False, embedding_shard=0).out
    spec = hetero_spec()
    with Engine.start(eng_dir) as eng:
        before = eng.stats()
        eng.logits([[5, 17, 98, 2], [97, 50, 49, 1]])  # ids on both ranks' rows, the last ones included
        issued = [a["tp_collectives"] - b["tp_collectives"] for a, b in zip(eng.stats(), before, strict=True)]
    assert issued == [sync_points_per_token(spec, Mapping(2, embedding_shard=0))] * 2
    assert issued[0] == spec.sync_points_per_token() + 1

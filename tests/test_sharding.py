"""Split rules: pieces reassemble the source, GQA duplication matches TRT-LLM's layout."""

import pytest
import torch

from export.layout import check_layout, rank_bytes, rank_pieces
from export.mapping import Mapping
from export.sharding import kv_head_range, padded_vocab, shard_for, take
from export.tensors import Role, model_tensors
from tests.conftest import hetero_spec
from tests.oracles import dup_kv, split


def test_split_requires_divisibility():
    t = torch.arange(12).reshape(6, 2)
    assert torch.equal(split(t, 1, 3, 0), t[2:4])
    with pytest.raises(ValueError, match="not divisible"):
        split(t, 0, 4, 0)


def test_dup_kv_repeats_each_head_contiguously():
    kv, hd = 2, 3
    w = torch.arange(kv * hd * 4, dtype=torch.float32).reshape(kv * hd, 4)
    d = dup_kv(w, kv, 4)
    expect = w.reshape(kv, hd, 4).repeat_interleave(2, dim=0).reshape(-1, 4)
    assert torch.equal(d, expect)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shards_match_trtllm_split_of_duplicated_tensors(tp):
    """Our range-based shard == TRT-LLM's dup_kv_weight + split, for every role and rank."""
    spec = hetero_spec()
    gen = torch.Generator().manual_seed(0)
    for ref in model_tensors(spec):
        full = torch.randn(ref.shape, generator=gen)
        for rank in range(tp):
            piece = take(full, shard_for(spec, ref, rank, tp), ref.shape)
            if tp == 1 or ref.role in (Role.EMBED, Role.ATTN_NORM, Role.FFN_NORM, Role.FINAL_NORM):
                expect = full
            elif ref.role in (Role.K, Role.V):
                kv = spec.layers[ref.layer].attention.kv_heads
                src = dup_kv(full, kv, tp) if tp > kv else full
                expect = split(src, rank, tp, 0)
            elif ref.role in (Role.O, Role.DOWN):
                expect = split(full, rank, tp, 1)
            elif ref.role is Role.LM_HEAD:
                padded = torch.cat([full, full.new_zeros(padded_vocab(spec.vocab, tp) - spec.vocab, spec.hidden)])
                expect = split(padded, rank, tp, 0)
            else:
                expect = split(full, rank, tp, 0)
            assert torch.equal(piece, expect), (ref, rank, tp)


def test_q_heads_on_a_rank_use_its_kv_heads():
    """HF GQA: q head h uses kv head h // (heads // kv); each rank must hold exactly those."""
    heads = 8
    for kv in (1, 2, 4, 8):
        for tp in (1, 2, 4, 8):
            if kv % tp and tp % kv:
                continue
            for rank in range(tp):
                q_heads = range(rank * heads // tp, (rank + 1) * heads // tp)
                needed = {h // (heads // kv) for h in q_heads}
                assert needed <= set(kv_head_range(kv, tp, rank))


def test_layout_checks_name_the_layer():
    spec = hetero_spec()
    assert check_layout(spec, Mapping(3, 1))[0] == "tp=3 does not divide num_attention_heads=8"
    assert any("layer 2: tp=3 does not divide FFN width 256" in p for p in check_layout(spec, Mapping(3, 1)))
    assert check_layout(spec, Mapping(1, 3)) == []  # uneven stages: TRT-LLM's split (tests/test_pipeline_stages.py)
    assert check_layout(spec, Mapping(1, 9)) == ["pp=9 is more stages than the 8 layers"]
    assert check_layout(spec, Mapping(8, 2)) == []


def test_pipeline_placement():
    spec = hetero_spec()
    m = Mapping(2, 2)
    first = {p.ref.role for p in rank_pieces(spec, m, 0)}
    last = {p.ref.role for p in rank_pieces(spec, m, 3)}
    assert Role.EMBED in first and Role.LM_HEAD not in first and Role.FINAL_NORM not in first
    assert Role.EMBED not in last and {Role.LM_HEAD, Role.FINAL_NORM} <= last
    layers0 = {p.ref.layer for p in rank_pieces(spec, m, 1) if p.ref.layer is not None}
    assert layers0 == {0, 1, 2, 3}
    total = sum(rank_bytes(spec, Mapping(1, 1), 0) for _ in [0])
    assert sum(rank_bytes(spec, m, r) for r in m.ranks()) >= total

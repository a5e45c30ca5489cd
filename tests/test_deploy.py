"""plan-deployment against figures derived independently of the layout code: Ultra's per-GPU
weights written out from its layer table, KV tokens = free bytes / KV bytes per token, verdicts."""

from __future__ import annotations

import json

import pytest

from export.cli import main
from export.deploy import GPUS, GiB, Option, candidates, evaluate, parse_gpu, plan_deployment
from export.deployment_plan import plan_report
from export.errors import ExportError
from export.layout import trtllm_pp_values
from export.mapping import Mapping
from export.spec import AttentionKind, ModelSpec
from tests.conftest import hetero_spec
from tests.test_spec import ULTRA

RESERVE = 4 * GiB


@pytest.fixture(scope="module")
def ultra() -> ModelSpec:
    return ModelSpec.load(ULTRA)


def by_hand(spec: ModelSpec, tp: int, *, fp8: bool = False, split_embedding: bool = False) -> int:
    """Rank 0's bytes at tp (pp 1), from the layer table: linears split tp ways (1 byte each in
    FP8, plus a float32 weight and input scale per linear on every rank), norms whole, embedding
    whole or split, lm_head split (bf16: excluded). Ultra's kv heads (8) divide tp 8."""
    h, hd, lin = spec.hidden, spec.head_dim, 1 if fp8 else 2
    linear = norms = scales = 0
    for lay in spec.layers:
        if lay.attention.kind is AttentionKind.FULL:
            linear += (2 * spec.heads + 2 * lay.attention.kv_heads) * hd * h // tp
            norms += h
            scales += 4 * 2 * 4  # q, k, v, o
        if lay.ffn.width is not None:
            linear += 3 * lay.ffn.width * h // tp
            norms += h
            scales += 3 * 2 * 4  # gate, up, down
    emb = spec.vocab * h // (tp if split_embedding else 1)
    return linear * lin + (norms + h + emb + spec.vocab * h // tp) * 2 + (scales if fp8 else 0)


def test_ultra_bf16_tp8_weights_equal_inspect_and_the_layer_table(ultra):
    row = evaluate(ultra, Option(Mapping(8), False, False), GPUS["h100-80gb"], seq_len=8192, batch=1,
                   reserve=RESERVE, kv_fraction=0.9, total_gpus=8)
    assert row["rank_weight_bytes"] == max(plan_report(ultra, Mapping(8), "bfloat16")["rank_weight_bytes"])
    assert row["rank_weight_bytes"] == by_hand(ultra, 8)
    assert f"{row['rank_weight_bytes'] / GiB:.1f}" == "62.4"
    split = evaluate(ultra, Option(Mapping(8, embedding_shard=0), False, False), GPUS["h100-80gb"], seq_len=8192,
                     batch=1, reserve=RESERVE, kv_fraction=0.9, total_gpus=8)
    assert split["rank_weight_bytes"] == by_hand(ultra, 8, split_embedding=True)
    assert row["rank_weight_bytes"] - split["rank_weight_bytes"] == ultra.vocab * ultra.hidden * 2 * 7 // 8


def test_fp8_weights_halve_the_linears(ultra):
    fp8 = evaluate(ultra, Option(Mapping(8), True, False), GPUS["h100-80gb"], seq_len=8192, batch=1,
                   reserve=RESERVE, kv_fraction=0.9, total_gpus=8)
    assert fp8["rank_weight_bytes"] == by_hand(ultra, 8, fp8=True)
    assert 0.5 < fp8["rank_weight_bytes"] / by_hand(ultra, 8) < 0.55  # embedding + lm_head stay bf16


def test_kv_tokens_are_free_bytes_over_kv_bytes_per_token(ultra):
    gpu = GPUS["h100-80gb"]
    row = evaluate(ultra, Option(Mapping(8), False, False), gpu, seq_len=8192, batch=1,
                   reserve=RESERVE, kv_fraction=0.9, total_gpus=8)
    # one kv head per attention layer per rank: 64 layers x K and V x 128 x 2 bytes = 32 KiB; 256 KiB in all
    assert len(ultra.attention_layers()) == 64
    assert row["rank_kv_bytes_per_token"] == 64 * 2 * 128 * 2 == 32 << 10
    assert 8 * row["rank_kv_bytes_per_token"] == ultra.kv_cache_bytes_per_token("bfloat16") == 256 << 10
    free = gpu.memory - by_hand(ultra, 8) - RESERVE
    assert row["rank_free_bytes"] == free and 0 < free < 10 * GiB  # fits 8 x 80 GB, with a small KV budget
    assert row["kv_tokens_per_rank"] == int(0.9 * free) // (32 << 10)
    assert row["max_sequences"] == row["kv_tokens_per_rank"] // 8192
    fp8kv = evaluate(ultra, Option(Mapping(8), False, True), gpu, seq_len=8192, batch=1,
                     reserve=RESERVE, kv_fraction=0.9, total_gpus=8)
    assert fp8kv["rank_kv_bytes_per_token"] == 16 << 10


def test_weights_over_the_gpu_do_not_fit_with_the_shortfall(ultra):
    gpu = GPUS["a100-40gb"]
    row = evaluate(ultra, Option(Mapping(8), False, False), gpu, seq_len=2048, batch=1,
                   reserve=RESERVE, kv_fraction=0.9, total_gpus=8)
    assert not row["fits"] and row["shortfall_bytes"] == by_hand(ultra, 8) + RESERVE - gpu.memory
    rep = plan_deployment(ultra, gpu, gpus=8, seq_len=2048)
    assert not rep["fits"] and rep["chosen"] is None
    assert {r["weights"] for r in rep["options"]} == {"bf16"}  # no FP8 tensor cores on an A100


def test_weights_fit_but_not_one_sequence(ultra):
    from export.deploy import GPU
    mib = 1 << 20
    gpu = GPU("tight", by_hand(ultra, 8) + RESERVE + 100 * mib, True)
    row = evaluate(ultra, Option(Mapping(8), False, False), gpu, seq_len=8192, batch=1,
                   reserve=RESERVE, kv_fraction=0.9, total_gpus=8)
    assert not row["fits"] and "not one sequence of 8192" in row["why"]
    assert row["shortfall_bytes"] == int(8192 * (32 << 10) / 0.9 - 100 * mib)  # 256 MiB of KV, at 0.9


def test_ranked_tables_h100_chooses_fp8_h200_fits_bf16(ultra):
    h100 = plan_deployment(ultra, GPUS["h100-80gb"], gpus=8, seq_len=8192, batch=16)
    assert h100["chosen"]["weights"] == "fp8" and (h100["chosen"]["tp"], h100["chosen"]["pp"]) == (8, 1)
    assert h100["best_bf16"]["tp"] == 8 and h100["best_bf16"]["parallel_embedding"]
    h200 = plan_deployment(ultra, GPUS["h200-141gb"], gpus=8, seq_len=8192, batch=16)
    assert h200["best_bf16"]["max_sequences"] > h100["best_bf16"]["max_sequences"]
    ranks = [r["rank"] for r in h200["options"]]
    assert ranks == list(range(1, len(ranks) + 1))
    assert all(r["fits"] for r in h200["options"][:10])


def test_only_buildable_pp_and_divisible_tp(ultra):
    ok = set(trtllm_pp_values(hetero_spec()))
    for o in candidates(hetero_spec(), 8, 8, fp8=True):
        assert o.mapping.pp in ok and 8 % o.mapping.tp == 0 and o.mapping.world_size <= 8
        assert o.mapping.parallel_embedding or o.mapping.embedding_shard is None
    assert max(o.mapping.tp for o in candidates(ultra, 16, 4, fp8=False)) == 4  # tp inside a node


def test_gpu_sizes():
    assert parse_gpu("80GB").memory == 80 * 10**9 and parse_gpu("79.6GiB").memory == int(79.6 * GiB)
    assert not parse_gpu("h100-80gb", fp8=False).fp8 and not parse_gpu("a100-80gb").fp8
    with pytest.raises(ExportError, match="not one of"):
        parse_gpu("big")
    with pytest.raises(ExportError, match="less than 1 GiB"):
        parse_gpu("80")


def test_cli_table_and_json(capsys):
    assert main(["plan-deployment", str(ULTRA), "--gpu", "h100-80gb", "--gpus", "8", "--seq-len", "8192",
                 "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "assumptions:" in out and "reserve 4.0 GiB per GPU" in out and "--reserve-gib" in out
    assert "chosen: #1 tp8 pp1 weights fp8" in out and "examples/quantization/quantize.py" in out
    assert "python -m export convert SRC --tp 8 --pp 1 --dtype bf16 --parallel-embedding" in out
    assert main(["plan-deployment", str(ULTRA), "--gpu", "a100-40gb", "--gpus", "8", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["chosen"] is None and rep["options"][0]["shortfall_bytes"] > 0
    assert main(["plan-deployment", str(ULTRA), "--gpu", "a100-40gb", "--gpus", "8"]) == 1
    assert "DOES NOT FIT on 8 x A100 40GB" in capsys.readouterr().out
    assert main(["plan-deployment", str(ULTRA), "--gpu", "h100-80gb", "--gpus", "0"]) == 2

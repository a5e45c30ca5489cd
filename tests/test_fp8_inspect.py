"""FP8 in `inspect` and `plan-deployment`: one byte rule (`layout.rank_bytes` by `stored_dtype`
+ scales) checked against figures derived independently (`oracles.fp8_rank_bytes`, from the rank
files' shapes), on the real Ultra-253B config."""

from __future__ import annotations

import json

import pytest

from export.cli import main
from export.deploy import GPUS, GiB, Option, evaluate
from export.deployment_plan import plan_report, planned
from export.errors import ConfigError
from export.layout import rank_bytes, rank_pieces
from export.mapping import Mapping
from export.quantization import HF_QUANT_CONFIG, Quantization
from export.spec import AttentionKind, ModelSpec
from export.tensors import Role
from tests.conftest import hetero_spec
from tests.oracles import fp8_rank_bytes
from tests.test_spec import ULTRA

LAYOUTS = [Mapping(8), Mapping(4, 2), Mapping(8, embedding_shard=0), Mapping(2, 4)]


@pytest.fixture(scope="module")
def ultra() -> ModelSpec:
    return ModelSpec.load(ULTRA)


def test_ultra_fp8_tp8_is_about_half_of_bf16_per_rank(ultra):
    bf16 = plan_report(ultra, Mapping(8))
    fp8 = plan_report(planned(ultra, "fp8", "fp8"), Mapping(8))
    assert f"{max(bf16['rank_weight_bytes']) / GiB:.1f}" == "62.4"
    assert f"{max(fp8['rank_weight_bytes']) / GiB:.1f}" == "33.4"
    ratio = max(fp8["rank_weight_bytes"]) / max(bf16["rank_weight_bytes"])
    assert 0.5 < ratio < 0.54  # the embedding and lm_head (excluded) stay bf16
    # KV: one kv head per attention layer per rank at tp 8: 64 layers x K and V x 128 values x 1 byte
    assert fp8["rank_kv_cache_bytes_per_token"] == [64 * 2 * 128] * 8
    assert bf16["rank_kv_cache_bytes_per_token"] == [64 * 2 * 128 * 2] * 8
    assert fp8["kv_cache_bytes_per_token"] * 2 == bf16["kv_cache_bytes_per_token"] == 256 << 10
    assert (fp8["quant_algo"], fp8["kv_cache_quant_algo"], fp8["kv_cache_dtype"]) == ("FP8", "FP8", "float8_e4m3fn")


@pytest.mark.parametrize("mapping", LAYOUTS, ids=str)
@pytest.mark.parametrize("fp8_kv", [False, True])
def test_every_rank_equals_the_independent_formula(ultra, mapping, fp8_kv):
    spec = planned(ultra, "fp8", "fp8" if fp8_kv else None)
    assert [rank_bytes(spec, mapping, r) for r in mapping.ranks()] == \
        [fp8_rank_bytes(ultra, mapping, r, fp8_kv=fp8_kv) for r in mapping.ranks()]


def test_bf16_weights_with_an_fp8_kv_cache_carry_only_kv_scales(ultra):
    spec = planned(ultra, None, "fp8")
    assert spec.quant == Quantization(None, "FP8")
    m = Mapping(8)
    assert rank_bytes(spec, m, 0) == rank_bytes(ultra, m, 0) + 64 * 8  # a k and a v scale per attention layer
    assert plan_report(spec, m)["rank_kv_cache_bytes_per_token"][0] == 64 * 2 * 128


# layout.FP8_ROLES, which plan-deployment's fp8 rows used before the one rule
OLD_FP8_ROLES = {Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN, Role.LINEAR_ATTN, Role.LINEAR_FFN}


def old_rule(spec: ModelSpec, mapping: Mapping, rank: int) -> int:
    """plan-deployment's fp8 rows before the one rule: FP8_ROLES at 1 byte, scales left out."""
    return sum(p.numel() * (1 if p.ref.role in OLD_FP8_ROLES else 2) for p in rank_pieces(spec, mapping, rank))


@pytest.mark.parametrize("mapping", LAYOUTS, ids=str)
def test_plan_deployment_fp8_rows_equal_the_old_rule_plus_the_scales(ultra, mapping):
    row = evaluate(ultra, Option(mapping, True, True), GPUS["h200-141gb"], seq_len=8192, batch=1,
                   reserve=4 * GiB, kv_fraction=0.9, total_gpus=mapping.world_size)
    for r in mapping.ranks():
        linears = sum(p.ref.role in OLD_FP8_ROLES for p in rank_pieces(ultra, mapping, r))
        attention = sum(p.ref.role is Role.V for p in rank_pieces(ultra, mapping, r))
        assert row["rank_weight_bytes_all"][r] == old_rule(ultra, mapping, r) + 8 * linears + 8 * attention
        # what plan-deployment prints is the same as before: the scales are kilobytes of gigabytes
        assert f"{row['rank_weight_bytes_all'][r] / GiB:.1f}" == f"{old_rule(ultra, mapping, r) / GiB:.1f}"
    assert row["rank_weight_bytes"] == max(plan_report(planned(ultra, "fp8", "fp8"), mapping)["rank_weight_bytes"])


def test_the_hetero_spec_linear_layers_count_as_fp8():
    """Linear replacements are linears too (Role.LINEAR_ATTN / LINEAR_FFN): 1 byte + two scales."""
    spec = hetero_spec()
    assert any(lay.attention.kind is AttentionKind.LINEAR for lay in spec.layers)
    for m in (Mapping(1), Mapping(2, 2)):
        want = [fp8_rank_bytes(spec, m, r, fp8_kv=True, dtype_bytes=4 if spec.dtype == "float32" else 2)
                for r in m.ranks()]
        assert [rank_bytes(planned(spec, "fp8", "fp8"), m, r) for r in m.ranks()] == want


def fp8_config_dir(tmp_path, quant: Quantization):
    d = tmp_path / "ultra-fp8"
    d.mkdir()
    cfg = json.loads(ULTRA.read_text())
    cfg["quantization_config"] = quant.config_json()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / HF_QUANT_CONFIG).write_text(json.dumps(quant.hf_quant_config()))
    return d


def test_inspect_on_an_fp8_config_equals_dtype_fp8(tmp_path, capsys):
    d = fp8_config_dir(tmp_path, Quantization("FP8", "FP8", ("lm_head",)))
    assert main(["inspect", str(d), "--tp", "8", "--json"]) == 0
    from_config = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(ULTRA), "--tp", "8", "--dtype", "fp8", "--kv-cache-dtype", "fp8", "--json"]) == 0
    from_flags = json.loads(capsys.readouterr().out)
    assert from_config == from_flags
    assert main(["inspect", str(d), "--tp", "8"]) == 0
    text = capsys.readouterr().out
    assert "quantization             FP8 per-tensor, KV cache FP8, excluded: lm_head" in text
    assert "per-rank weights         33.4 GiB max" in text and "(fp8 linears, bfloat16 rest)" in text
    assert "per-rank KV cache        16.0 KiB per token max (float8_e4m3fn)" in text
    # --dtype bf16 plans the unquantized model; --kv-cache-dtype bf16 drops the FP8 cache
    assert main(["inspect", str(d), "--tp", "8", "--dtype", "bf16", "--kv-cache-dtype", "bf16", "--json"]) == 0
    assert max(json.loads(capsys.readouterr().out)["rank_weight_bytes"]) == rank_bytes(ModelSpec.load(ULTRA),
                                                                                       Mapping(8), 0)


def test_an_fp8_config_keeps_its_own_exclude_modules(tmp_path, ultra):
    d = fp8_config_dir(tmp_path, Quantization("FP8", None, ("lm_head", "model.layers.0.*")))
    spec = planned(ModelSpec.load(d), "fp8")
    assert spec.quant.exclude == ("lm_head", "model.layers.0.*")
    layer0 = sum(p.numel() for p in rank_pieces(ultra, Mapping(1), 0)
                 if p.ref.layer == 0 and p.ref.role not in (Role.ATTN_NORM, Role.FFN_NORM))
    assert rank_bytes(spec, Mapping(1), 0) == rank_bytes(planned(ultra, "fp8"), Mapping(1), 0) + layer0 - 7 * 8


def test_a_kv_cache_dtype_other_than_fp8_or_the_weights_is_refused(ultra):
    with pytest.raises(ConfigError, match=r"--kv-cache-dtype fp16: the KV cache is fp8 or the weights' dtype"):
        planned(ultra, None, "fp16")

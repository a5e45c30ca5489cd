"""The model description: parsing real and malformed configs, round trips, the width rule."""

import copy
import json
from pathlib import Path

import pytest

from export.errors import ConfigError
from export.spec import (
    AttentionKind,
    FFNKind,
    ModelSpec,
    ffn_mult_to_width,
    parse_hf_config,
    width_to_ffn_mult,
)
from export.synthetic import llama_config
from export.trtllm.config import trtllm_layer_configs
from tests.conftest import hetero_spec, llama_spec

ULTRA = Path(__file__).resolve().parent / "data/Llama-3_1-Nemotron-Ultra-253B-v1.config.json"


@pytest.fixture(scope="module")
def ultra_cfg() -> dict:
    return json.loads(ULTRA.read_text())


def test_ultra_counts(ultra_cfg):
    spec = parse_hf_config(ultra_cfg)
    assert spec.num_layers == 162
    assert len(spec.empty_layers()) == 81
    assert len(spec.attention_layers()) == 64
    assert len(spec.ffn_layers()) == 81
    assert {spec.layers[i].attention.kv_heads for i in spec.attention_layers()} == {8}
    assert [spec.layers[i].ffn.width for i in (125, 134, 143, 149)] == [399360, 425984, 343040, 301056]
    assert spec.layers[0].ffn.width == 5376 and spec.head_dim == 128
    assert spec.rope_scaling is not None and spec.rope_scaling.factor == 16.0
    assert spec.sync_points_per_token() == 146


def test_width_rule_is_the_float_expression():
    assert ffn_mult_to_width(4.875, 16384) == 53248
    assert ffn_mult_to_width(36.5625, 16384) == 399360
    assert ffn_mult_to_width(0.4875, 16384) == 5376  # int(5324.8) -> 5324 -> 5376
    for width in (256, 768, 343040, 425984, 53248 * 3):
        assert ffn_mult_to_width(width_to_ffn_mult(width, 16384), 16384) == width
    with pytest.raises(ConfigError, match="multiple of 256"):
        width_to_ffn_mult(1000, 64)


def test_hf_round_trip_keeps_structure_and_passthrough(ultra_cfg):
    spec = parse_hf_config(ultra_cfg)
    again = parse_hf_config(json.loads(json.dumps(spec.to_hf_config())))
    assert again == spec
    out = spec.to_hf_config()
    assert out["auto_map"] == ultra_cfg["auto_map"] and out["eos_token_id"] == [128001, 128008, 128009]
    assert out["block_configs"][125]["ffn"]["ffn_mult"] == 36.5625
    spec2 = hetero_spec()
    assert parse_hf_config(spec2.to_hf_config()) == spec2


def test_trtllm_layer_configs_use_only_allowed_keys(ultra_cfg):
    lcs = trtllm_layer_configs(parse_hf_config(ultra_cfg))
    assert len(lcs) == 162
    for lc in lcs:
        assert set(lc) == {"attention", "ffn"}
        assert set(lc["attention"]) == {"impl", "num_key_value_heads"}
        assert set(lc["ffn"]) == {"impl", "intermediate_size"}
    assert lcs[0]["attention"] == {"impl": "attention", "num_key_value_heads": 8}
    assert lcs[125] == {"attention": {"impl": "no_op", "num_key_value_heads": None},
                        "ffn": {"impl": "mlp", "intermediate_size": 399360}}
    assert lcs[9]["ffn"] == {"impl": "no_op", "intermediate_size": None}


def test_uniform_llama_config():
    cfg = llama_config(llama_spec())
    spec = parse_hf_config(cfg)
    assert spec.architecture == "LlamaForCausalLM" and spec.num_layers == 2
    assert all(lay.attention.kind is AttentionKind.FULL and lay.attention.kv_heads == 2 for lay in spec.layers)
    assert all(lay.ffn.kind is FFNKind.SWIGLU and lay.ffn.width == 256 for lay in spec.layers)
    del cfg["head_dim"]
    assert parse_hf_config(cfg).head_dim == 64 // 4  # hidden // heads when omitted
    cfg.pop("num_key_value_heads")
    assert parse_hf_config(cfg).layers[0].attention.kv_heads == 4


def _set(cfg, layer, sub, key, value):
    cfg = copy.deepcopy(cfg)
    cfg["block_configs"][layer][sub][key] = value
    return cfg


@pytest.mark.parametrize("sub,key,value,match", [
    ("attention", "sparsify", {"x": 1}, "layer 3 attention: field 'sparsify'"),
    ("attention", "window_length", 4096, "layer 3 attention: field 'window_length'"),
    ("attention", "num_sink_tokens", 4, "layer 3 attention: field 'num_sink_tokens'"),
    ("attention", "unshifted_sink", True, "layer 3 attention: field 'unshifted_sink'"),
    ("attention", "n_heads_in_group", 7, "layer 3 attention: field 'n_heads_in_group'"),
    ("attention", "n_heads_in_group", None, "layer 3 attention: field 'n_heads_in_group'"),
    ("ffn", "sparsify", {"x": 1}, "layer 3 ffn: field 'sparsify'"),
    ("ffn", "hidden_act", "gelu", "layer 3 ffn: field 'hidden_act'"),
    ("ffn", "ffn_mult", "wide", "layer 3 ffn: field 'ffn_mult'"),
    ("ffn", "ffn_mult", -1.0, "layer 3 ffn: field 'ffn_mult'"),
])
def test_unsupported_or_malformed_block_fields(ultra_cfg, sub, key, value, match):
    with pytest.raises(ConfigError, match=match):
        parse_hf_config(_set(ultra_cfg, 3, sub, key, value))


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "not supported"),
    (lambda c: c.pop("hidden_size"), "'hidden_size' is missing"),
    (lambda c: c.update(num_attention_heads="128"), "'num_attention_heads' = '128': must be a positive integer"),
    (lambda c: c.update(num_hidden_layers=10), "num_hidden_layers is 10"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type"),
    (lambda c: c.update(block_configs={"a": 1}), "must be a list"),
    (lambda c: c["block_configs"].__setitem__(5, {"attention": {}}), "layer 5"),
])
def test_malformed_top_level(ultra_cfg, mutate, match):
    cfg = copy.deepcopy(ultra_cfg)
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        parse_hf_config(cfg)


def test_load_reports_missing_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelSpec.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec.load(tmp_path)


@pytest.mark.parametrize("field_name,value", [
    ("hidden_size", -64), ("hidden_size", 0), ("num_attention_heads", 0), ("vocab_size", -1),
    ("head_dim", 0), ("head_dim", "32"), ("num_hidden_layers", "162"), ("num_hidden_layers", True),
    ("rope_theta", -1), ("rope_theta", "500000"), ("rope_theta", float("nan")), ("rms_norm_eps", -1),
    ("rms_norm_eps", "1e-5"), ("max_position_embeddings", -1), ("max_position_embeddings", "131072"),
    ("tie_word_embeddings", "false"), ("rope_scaling", "llama3"), ("torch_dtype", ["bfloat16"]),
])
def test_wrong_values_are_refused_naming_the_field(ultra_cfg, field_name, value):
    """Values that used to be coerced or accepted (`"false"` read as True, negative sizes)."""
    cfg = copy.deepcopy(ultra_cfg) | {field_name: value}
    with pytest.raises(ConfigError, match=f"'{field_name}'") as e:
        parse_hf_config(cfg)
    assert "\n" not in str(e.value)


def test_every_top_level_problem_is_reported_at_once(ultra_cfg):
    cfg = copy.deepcopy(ultra_cfg) | {"hidden_size": 0, "rope_theta": "x", "tie_word_embeddings": "no"}
    with pytest.raises(ConfigError, match="3 problems") as e:
        parse_hf_config(cfg)
    for name in ("hidden_size", "rope_theta", "tie_word_embeddings"):
        assert f"'{name}'" in str(e.value)


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{}", "not UTF-8"), (b"[1, 2]", "JSON object"), (b"null", "JSON object"),
])
def test_config_file_that_is_not_a_utf8_json_object(tmp_path, content, match):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match) as e:
        ModelSpec.load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_block_parts_that_are_not_objects(ultra_cfg):
    cfg = copy.deepcopy(ultra_cfg)
    cfg["block_configs"][2]["attention"] = 7
    with pytest.raises(ConfigError, match="layer 2: field 'attention' = 7: must be an object"):
        parse_hf_config(cfg)


def test_errors_from_a_file_name_the_file(tmp_path, ultra_cfg):
    (tmp_path / "config.json").write_text(json.dumps(ultra_cfg | {"vocab_size": -5}))
    with pytest.raises(ConfigError, match=r"config\.json: field 'vocab_size' = -5"):
        ModelSpec.load(tmp_path)

"""Model-Optimizer Puzzletron checkpoints: every block_configs field parsed or refused by name, the
source's schema kept by every HF config we write, plain (gated: false) MLPs, parallel blocks.

The configs below are written as Puzzletron's own `DeciLMConfig.to_dict` writes them
(`dataclasses.asdict` of its BlockConfig: every field, in dataclass order, irrelevant fields of
no-op subblocks nulled by `__post_init__`), for both releases of its `block_config.py`:
v1 (`modelopt/torch/_compress/decilm/deci_lm_hf_code/block_config.py`, 2025-11: `n_heads_in_group`,
sink/window fields, `gated`, `hidden_act`) and v2 (`modelopt/torch/puzzletron/block_config.py`,
2026-01 on: per-block `num_key_value_heads`).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from export.cli import main
from export.errors import ConfigError, ExportError
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import FusionPlan, PlanError
from export.io.reader import CheckpointReader
from export.mapping import Mapping
from export.rank_weights import HFRankWeights
from export.runtime.engine import Engine
from export.runtime.model import load_decoder
from export.spec import FFNKind, ModelSpec, parse_hf_config, read_config_json
from export.synthetic import write_random_checkpoint
from export.tensors import Role, model_tensors
from export.trtllm.config import trtllm_layer_configs

HIDDEN, HEADS = 64, 8
EPS = 1e-5


# ---- Puzzletron configs as its own code writes them ----------------------------------------
def v1_attention(kv: int | None) -> dict:
    if kv is None:  # AttentionConfig(no_op=True) after __post_init__
        return {"no_op": True, "replace_with_linear": False, "sparsify": None, "weights_precision": "bf16",
                "n_heads_in_group": None, "window_length": None, "num_sink_tokens": None,
                "use_prefill_window_in_sink_attention": None, "unshifted_sink": None, "mamba": None,
                "llama4": None}
    return {"no_op": False, "replace_with_linear": False, "sparsify": None, "weights_precision": "bf16",
            "n_heads_in_group": HEADS // kv, "window_length": None, "num_sink_tokens": None,
            "use_prefill_window_in_sink_attention": False, "unshifted_sink": False, "mamba": None,
            "llama4": None}


def v1_ffn(width: int | None, gated: bool = True) -> dict:
    if width is None:
        return {"no_op": True, "replace_with_linear": False, "sparsify": None, "weights_precision": "bf16",
                "gated": None, "hidden_act": None, "moe": None, "intermediate_size": None}
    return {"no_op": False, "replace_with_linear": False, "sparsify": None, "weights_precision": "bf16",
            "gated": gated, "hidden_act": "silu", "moe": None, "intermediate_size": width}


def v2_attention(kv: int | None) -> dict:
    return {"no_op": kv is None, "replace_with_linear": False, "sparsify": None, "weights_precision": "bf16",
            "num_key_value_heads": kv, "llama4": None, "mamba": None}


def v2_ffn(width: int | None) -> dict:
    return {"no_op": width is None, "replace_with_linear": False, "sparsify": None,
            "weights_precision": "bf16", "moe": None, "intermediate_size": width}


def block(attention: dict, ffn: dict) -> dict:
    return {"attention": attention, "ffn": ffn, "parallel_blocks": None}


def puzzletron_config(blocks: list[dict]) -> dict:
    """Top level as DeciLMConfig.to_dict writes it: no global intermediate_size /
    num_key_value_heads / hidden_act (its PER_LAYER_ATTRIBUTE_MAPPING keeps them per block)."""
    return {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
            "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                         "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
            "hidden_size": HIDDEN, "num_attention_heads": HEADS, "head_dim": HIDDEN // HEADS,
            "num_hidden_layers": len(blocks), "vocab_size": 99, "rms_norm_eps": EPS,
            "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 256,
            "tie_word_embeddings": False, "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
            "position_embedding_type": "rope", "llama4_attn_implementation": "sdpa",
            "block_return_only_hidden_states": False, "router_aux_loss_coef": 0.01,
            "router_z_loss_coef": 0.0, "output_router_logits": False, "o_proj_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "block_configs": blocks}


def v1_config(plain_layer: int | None = None) -> dict:
    """Attention+FFN, then an attention-free run of unequal widths (one plain MLP if asked)."""
    widths = [None, 256, 768, 512, 256]
    blocks = [block(v1_attention(2), v1_ffn(256))]
    blocks += [block(v1_attention(None), v1_ffn(w, gated=i != plain_layer)) for i, w in enumerate(widths) if w]
    blocks += [block(v1_attention(4), v1_ffn(None)), block(v1_attention(None), v1_ffn(None))]
    return puzzletron_config(blocks)


def v2_config() -> dict:
    blocks = [block(v2_attention(2), v2_ffn(256)), block(v2_attention(None), v2_ffn(768)),
              block(v2_attention(None), v2_ffn(512)), block(v2_attention(None), v2_ffn(256)),
              block(v2_attention(4), v2_ffn(None))]
    return puzzletron_config(blocks)


def released_config() -> dict:
    """The released Nemotron schema (ffn_mult, n_heads_in_group, the sink/window keys)."""
    def att(kv):
        return {"n_heads_in_group": HEADS // kv if kv else None, "no_op": kv is None,
                "replace_with_linear": False, "sparsify": None, "num_sink_tokens": None, "window_length": None,
                "unshifted_sink": False, "use_prefill_window_in_sink_attention": False}

    def ffn(mult):
        return {"ffn_mult": mult, "no_op": mult is None, "replace_with_linear": False, "sparsify": None}

    cfg = puzzletron_config([{"attention": att(2), "ffn": ffn(6.0)}, {"attention": att(None), "ffn": ffn(18.0)},
                             {"attention": att(None), "ffn": ffn(12.0)}, {"attention": att(4), "ffn": ffn(None)}])
    for key in ("position_embedding_type", "llama4_attn_implementation", "block_return_only_hidden_states",
                "router_aux_loss_coef", "router_z_loss_coef", "output_router_logits", "o_proj_bias"):
        del cfg[key]
    cfg.update(intermediate_size=None, num_key_value_heads=None, hidden_act="silu")
    return cfg


def checkpoint(tmp_path, cfg: dict, name: str = "src", seed: int = 0):
    """Random weights for `cfg`, with config.json exactly `cfg` (as the source's code wrote it)."""
    spec = parse_hf_config(cfg)
    path = write_random_checkpoint(tmp_path / name, spec, seed=seed)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def assert_same_schema(written: dict, source: dict) -> None:
    """Every top-level key the source had is there (same value unless the model changed), no
    per-layer global it lacked was added, and each block uses exactly the source's keys."""
    for key, value in source.items():
        assert key in written, key
        if key not in ("block_configs", "num_hidden_layers"):
            assert written[key] == value, key
    assert set(written) - set(source) <= {"num_hidden_layers"}, set(written) - set(source)
    ref = source["block_configs"][0]
    blocks = [*written["block_configs"]]
    blocks += [br for b in written["block_configs"] for br in (b.get("parallel_blocks") or [])]
    for b in blocks:
        assert list(b) == list(ref)
        for part in ("attention", "ffn"):
            assert b[part] is None or list(b[part]) == list(ref[part])


# ---- deliverable 2: the source's schema on every write ----------------------------------------
@pytest.mark.parametrize("make", [v1_config, v2_config, released_config], ids=["puzzletron-v1", "puzzletron-v2",
                                                                               "released"])
def test_round_trip_writes_the_source_schema_field_by_field(make):
    cfg = make()
    spec = parse_hf_config(cfg)
    out = spec.to_hf_config()
    assert out["block_configs"] == cfg["block_configs"]  # every block, every field, every value
    assert_same_schema(out, cfg)
    assert parse_hf_config(json.loads(json.dumps(out))) == spec
    assert spec.block_schema.name == ("released" if make is released_config else "puzzletron")


def test_v2_reads_per_block_num_key_value_heads():
    spec = parse_hf_config(v2_config())
    assert [lay.attention.kv_heads for lay in spec.layers] == [2, None, None, None, 4]
    bad = v2_config()
    bad["block_configs"][0]["attention"]["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="layer 0 attention: field 'num_key_value_heads' = 3"):
        parse_hf_config(bad)


@pytest.mark.parametrize("make", [v1_config, v2_config, released_config], ids=["puzzletron-v1", "puzzletron-v2",
                                                                               "released"])
def test_fuse_writes_the_source_schema(tmp_path, make):
    cfg = make()
    src = checkpoint(tmp_path, cfg)
    res = fuse_checkpoint(src, FusionPlan([(1, 3)] if make is not released_config else [(1, 2)]),
                          tmp_path / "fused", progress=False)
    written = read_config_json(tmp_path / "fused")
    assert_same_schema(written, cfg)
    fused = written["block_configs"][1]["ffn"]
    if make is released_config:
        assert fused["ffn_mult"] == 30.0 and "intermediate_size" not in fused
    else:  # Puzzletron's FFNConfig asserts "Intermediate size must be provided for an FFN block"
        assert fused["intermediate_size"] == 768 + 512 + 256 and "ffn_mult" not in fused
        for b in written["block_configs"]:
            assert b["ffn"]["no_op"] or b["ffn"]["intermediate_size"] is not None
            assert b["ffn"]["intermediate_size"] is None or b["ffn"]["intermediate_size"] % 256 == 0
    again = ModelSpec.load(tmp_path / "fused")
    assert again == res.after and again.block_schema.name == parse_hf_config(cfg).block_schema.name
    # the untouched blocks are written exactly as the source wrote them
    assert written["block_configs"][0] == cfg["block_configs"][0]
    assert written["block_configs"][-1] == cfg["block_configs"][-1]


# ---- deliverable 1: every field parsed or refused by name ------------------------------------
def _set(cfg, layer, part, key, value):
    cfg = copy.deepcopy(cfg)
    cfg["block_configs"][layer][part][key] = value
    return cfg


@pytest.mark.parametrize("layer,part,key,value,match", [
    (1, "ffn", "moe", {"num_local_experts": 8, "num_experts_per_tok": 1, "expert_intermediate_dim": 256,
                       "shared_expert_intermediate_dim": 256}, "layer 1 ffn: field 'moe'"),
    (1, "ffn", "weights_precision", "fp8", "layer 1 ffn: field 'weights_precision' = 'fp8'"),
    (0, "attention", "weights_precision", "int4", "layer 0 attention: field 'weights_precision'"),
    (0, "attention", "mamba", {"state_dim": 16, "num_heads": 4, "head_dim": 8, "num_groups": 1},
     "layer 0 attention: field 'mamba'"),
    (0, "attention", "llama4", {"attention_chunk_size": 8192}, "layer 0 attention: field 'llama4'"),
    (0, "attention", "window_length", 128, "layer 0 attention: field 'window_length'"),
    (0, "attention", "num_sink_tokens", 4, "layer 0 attention: field 'num_sink_tokens'"),
    (0, "attention", "unshifted_sink", True, "layer 0 attention: field 'unshifted_sink'"),
    (1, "ffn", "hidden_act", "gelu", "layer 1 ffn: field 'hidden_act' = 'gelu'"),
    (1, "ffn", "gated", "no", "layer 1 ffn: field 'gated' = 'no'"),
    (1, "ffn", "sparsify", ["x"], "layer 1 ffn: field 'sparsify'"),
    (1, "ffn", "experts", 8, "layer 1 ffn: field 'experts' is not part of"),
    (0, "attention", "qk_norm", True, "layer 0 attention: field 'qk_norm' is not part of"),
])
def test_puzzletron_fields_refused_by_name(layer, part, key, value, match):
    with pytest.raises(ConfigError, match=match):
        parse_hf_config(_set(v1_config(), layer, part, key, value))


@pytest.mark.parametrize("key,value", [("position_embedding_type", "mistral_yarn"), ("o_proj_bias", True)])
def test_puzzletron_globals_refused_by_name(key, value):
    cfg = v1_config()
    cfg[key] = value
    with pytest.raises(ConfigError, match=f"field '{key}'"):
        parse_hf_config(cfg)


# ---- gated: false (DeciLMVanillaMLP: down(act(up(x)))) ---------------------------------------
def _rms(x, scale):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * scale


def test_plain_mlp_reads_runs_and_is_refused_by_trtllm(tmp_path):
    cfg = v1_config(plain_layer=2)  # block 2: gated false
    spec = parse_hf_config(cfg)
    lay = spec.layers[2]
    assert lay.ffn.kind is FFNKind.SWIGLU and not lay.ffn.gated and lay.short() == "-/M768"
    names = {r.hf_name for r in model_tensors(spec)}
    assert "model.layers.2.mlp.gate_proj.weight" not in names and "model.layers.2.mlp.up_proj.weight" in names
    src = checkpoint(tmp_path, cfg)
    reader = CheckpointReader(src)
    reader.validate(spec)  # no "missing tensor ...gate_proj"
    dec = load_decoder(HFRankWeights(reader, spec, Mapping(), 0))
    x = torch.randn(1, 3, HIDDEN)
    w = {n: reader.get(n) for n in reader.names()}
    p = "model.layers.2."
    want = x + F.silu(_rms(x, w[p + "post_attention_layernorm.weight"]) @ w[p + "mlp.up_proj.weight"].T) \
        @ w[p + "mlp.down_proj.weight"].T
    torch.testing.assert_close(dec.block(2, x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"layer 2 ffn: field 'gated' = false.*TensorRT-LLM"):
        trtllm_layer_configs(spec)
    from export.trtllm.convert import convert
    with pytest.raises(ExportError, match="layer 2 ffn: field 'gated' = false"):
        convert(src, tmp_path / "engine", tp=1, progress=False)
    assert not (tmp_path / "engine").exists()


def test_plain_mlps_fuse_into_one_plain_mlp_and_mixed_groups_are_refused(tmp_path):
    cfg = v1_config()
    for i in (1, 2, 3, 4):
        cfg["block_configs"][i]["ffn"]["gated"] = False
    src = checkpoint(tmp_path, cfg)
    res = fuse_checkpoint(src, FusionPlan([(1, 3)]), tmp_path / "fused", progress=False)
    fused = res.after.layers[1]
    assert not fused.ffn.gated and fused.ffn.width == 768 + 512 + 256
    written = read_config_json(tmp_path / "fused")["block_configs"][1]["ffn"]
    assert written["gated"] is False and written["intermediate_size"] == 1536
    # the fused plain MLP is the parallel sum of the members' (Theorem 3.1 holds for any elementwise act)
    w_src = {n: CheckpointReader(src).get(n) for n in CheckpointReader(src).names()}
    w_out = CheckpointReader(tmp_path / "fused")
    x = torch.randn(2, 4, HIDDEN)
    want = x.clone()
    for i in (1, 2, 3):
        p = f"model.layers.{i}."
        want += F.silu(_rms(x, w_src[p + "post_attention_layernorm.weight"]) @ w_src[p + "mlp.up_proj.weight"].T) \
            @ w_src[p + "mlp.down_proj.weight"].T
    p = "model.layers.1."
    up = _rms(x, w_out.get(p + "post_attention_layernorm.weight")) @ w_out.get(p + "mlp.up_proj.weight").T
    got = x + F.silu(up) @ w_out.get(p + "mlp.down_proj.weight").T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mixed = v1_config(plain_layer=2)
    with pytest.raises(PlanError, match="mixes SwiGLU FFNs with plain"):
        FusionPlan([(1, 3)]).resolve(parse_hf_config(mixed))


# ---- parallel_blocks (DeciLMMultiDecoderLayer) -------------------------------------------------
def parallel_config(with_attention: bool = False) -> dict:
    """Layer 1 is a parallel-blocks layer of two FFN-only branches (or one attention+FFN branch)."""
    cfg = v1_config()
    first = block(v1_attention(2), v1_ffn(256)) if with_attention else block(v1_attention(None), v1_ffn(768))
    cfg["block_configs"][1] = {"attention": None, "ffn": None,
                               "parallel_blocks": [first, block(v1_attention(None), v1_ffn(512))]}
    return cfg


def test_parallel_blocks_are_read_named_and_shown(tmp_path, capsys):
    cfg = parallel_config()
    spec = parse_hf_config(cfg)
    lay = spec.layers[1]
    assert lay.is_parallel and [b.ffn.width for b in lay.branches] == [768, 512]
    assert lay.short() == "P[-/F768 + -/F512]" and lay.sync_points() == 1
    assert spec.to_hf_config()["block_configs"] == cfg["block_configs"]
    names = {r.hf_name for r in model_tensors(spec)}
    assert "model.layers.1.parallel_blocks.1.post_attention_layernorm.weight" in names
    assert "model.layers.1.parallel_blocks.0.mlp.gate_proj.weight" in names
    assert not any(n.startswith("model.layers.1.mlp") for n in names)
    src = checkpoint(tmp_path, cfg)
    CheckpointReader(src).validate(spec)  # no "unexpected tensor ...parallel_blocks..."
    assert main(["inspect", str(src), "--target", "cpu"]) == 0  # the cpu engine runs it
    out = capsys.readouterr().out
    assert "parallel blocks          layer 1: 2 branches (-/F768 + -/F512) on one input, summed: 1 sync" in out
    assert "FAILS" not in out
    assert main(["inspect", str(src)]) == 0  # ... and convert writes it as one wide TRT-LLM FFN
    capsys.readouterr()
    with_attention = checkpoint(tmp_path, parallel_config(with_attention=True), name="att")
    assert main(["inspect", str(with_attention)]) == 2
    assert "layer 1: field 'parallel_blocks'" in capsys.readouterr().out
    assert json.loads(_inspect_json(src, capsys))["parallel_layers"] == [
        {"layer": 1, "branches": ["-/F768", "-/F512"], "sync_points": 1}]


def _inspect_json(src, capsys) -> str:
    main(["inspect", str(src), "--json"])
    return capsys.readouterr().out


def test_parallel_blocks_with_attention_refused_by_stages_that_cannot_run_them(tmp_path):
    cfg = parallel_config(with_attention=True)
    spec = parse_hf_config(cfg)
    assert spec.layers[1].short() == "P[A2/F256 + -/F512]" and spec.layers[1].sync_points() == 2
    src = checkpoint(tmp_path, cfg)
    from export.trtllm.convert import convert
    with pytest.raises(ExportError, match=r"layer 1: field 'parallel_blocks'.*branch 0 \(A2/F256\) has attention"):
        convert(src, tmp_path / "engine", tp=1, progress=False)
    assert not (tmp_path / "engine").exists()
    with pytest.raises(PlanError, match="layer 1 is a parallel-blocks layer"):
        FusionPlan([(1, 3)]).resolve(spec)


def test_fuse_copies_a_parallel_layer_it_does_not_touch(tmp_path):
    cfg = parallel_config()
    src = checkpoint(tmp_path, cfg)
    fuse_checkpoint(src, FusionPlan([(2, 4)]), tmp_path / "fused", progress=False)
    written = read_config_json(tmp_path / "fused")
    assert written["block_configs"][1] == cfg["block_configs"][1]
    a, b = CheckpointReader(src), CheckpointReader(tmp_path / "fused")
    name = "model.layers.1.parallel_blocks.1.mlp.down_proj.weight"
    assert torch.equal(a.get(name), b.get(name))


@pytest.mark.parametrize("outer,match", [
    ({"attention": v1_attention(2)}, "layer 1: field 'attention'"),
    ({"ffn": v1_ffn(256)}, "layer 1: field 'ffn'"),
    ({"parallel_blocks": []}, "layer 1: field 'parallel_blocks' = \\[\\]"),
])
def test_malformed_parallel_layers_refused_by_name(outer, match):
    cfg = parallel_config()
    cfg["block_configs"][1].update(outer)
    with pytest.raises(ConfigError, match=match):
        parse_hf_config(cfg)


def test_branch_fields_are_checked_like_any_block():
    cfg = parallel_config()
    cfg["block_configs"][1]["parallel_blocks"][1]["ffn"]["moe"] = {"num_local_experts": 2}
    with pytest.raises(ConfigError, match=r"layer 1 parallel_blocks\.1 ffn: field 'moe'"):
        parse_hf_config(cfg)


def test_roles_of_a_plain_mlp_exclude_the_gate():
    spec = parse_hf_config(v1_config(plain_layer=1))
    roles = {r.role for r in model_tensors(spec) if r.layer == 1}
    assert roles == {Role.FFN_NORM, Role.UP, Role.DOWN}


def _branch_out(x, w, layer, k, gated=True):
    p = f"model.layers.{layer}.parallel_blocks.{k}."
    x = _rms(x, w[p + "post_attention_layernorm.weight"])
    up = x @ w[p + "mlp.up_proj.weight"].T
    act = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * up if gated else F.silu(up)
    return act @ w[p + "mlp.down_proj.weight"].T


def test_runtime_runs_parallel_blocks_as_defined(tmp_path):
    """DeciLMMultiDecoderLayer: sum_k branch_k(x) - (n-1) x, each branch a whole decoder layer."""
    cfg = parallel_config()
    cfg["block_configs"][1]["parallel_blocks"].append(block(v1_attention(None), v1_ffn(256, gated=False)))
    spec = parse_hf_config(cfg)
    src = checkpoint(tmp_path, cfg)
    reader = CheckpointReader(src)
    reader.validate(spec)
    w = {n: reader.get(n) for n in reader.names()}
    dec = load_decoder(HFRankWeights(reader, spec, Mapping(), 0))
    x = torch.randn(2, 5, HIDDEN)
    branches = [x + _branch_out(x, w, 1, k, gated=k < 2) for k in range(3)]
    want = sum(branches) - 2 * x
    torch.testing.assert_close(dec.block(1, x), want, rtol=1e-5, atol=1e-5)
    logits = dec(torch.tensor([[1, 5, 7]]))
    assert logits.shape == (1, 3, 99) and torch.isfinite(logits).all()


# ---- fuse --as parallel-blocks ------------------------------------------------------------------
def test_parallel_blocks_form_equals_wide_ffn_form(tmp_path, capsys):
    """Both representations of one fusion compute x + sum_j FFN_j(norm_j(x)): <= 1e-5 in fp32."""
    cfg = v1_config()
    src = checkpoint(tmp_path, cfg, seed=3)
    (tmp_path / "plan.json").write_text(json.dumps(FusionPlan([(1, 3)]).to_json()))
    assert main(["fuse", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "par"),
                 "--as", "parallel-blocks"]) == 0
    assert "one parallel-blocks layer of 3 branches" in capsys.readouterr().out
    wide = fuse_checkpoint(src, FusionPlan([(1, 3)]), tmp_path / "wide", progress=False)
    par_spec = ModelSpec.load(tmp_path / "par")
    lay = par_spec.layers[1]
    assert lay.is_parallel and [b.ffn.width for b in lay.branches] == [256, 768, 512]
    assert par_spec.num_layers == wide.after.num_layers
    assert par_spec.sync_points_per_token() == wide.after.sync_points_per_token()
    written = read_config_json(tmp_path / "par")
    assert_same_schema({k: v for k, v in written.items()}, cfg)
    assert [b["ffn"] for b in written["block_configs"][1]["parallel_blocks"]] == \
        [cfg["block_configs"][i]["ffn"] for i in (1, 2, 3)]
    # weights copied unchanged under the branch prefix
    a, b = CheckpointReader(src), CheckpointReader(tmp_path / "par")
    assert torch.equal(a.get("model.layers.3.mlp.down_proj.weight"),
                       b.get("model.layers.1.parallel_blocks.2.mlp.down_proj.weight"))
    par = load_decoder(HFRankWeights(b, par_spec, Mapping(), 0))
    wid = load_decoder(HFRankWeights(CheckpointReader(tmp_path / "wide"), wide.after, Mapping(), 0))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    torch.testing.assert_close(par(ids), wid(ids), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 4, HIDDEN)
    assert (par.block(1, x) - wid.block(1, x)).abs().max() <= 1e-5


def test_parallel_blocks_form_refused_where_the_source_cannot_load_it(tmp_path):
    src = checkpoint(tmp_path, released_config())
    with pytest.raises(ExportError, match="released: its DeciLM code has no parallel blocks"):
        fuse_checkpoint(src, FusionPlan([(1, 2)]), tmp_path / "out", progress=False, form="parallel-blocks")
    with pytest.raises(ExportError, match="--norm last"):
        fuse_checkpoint(src, FusionPlan([(1, 2)]), tmp_path / "out", progress=False, form="parallel-blocks",
                        norm="last")
    assert not (tmp_path / "out").exists()


# ---- convert: an attention-free parallel_blocks layer as one wide TRT-LLM FFN ------------------
@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])  # tp 2 verifies in 2 processes
def test_convert_parallel_blocks_to_one_wide_ffn_and_verify(tmp_path, tp):
    from export.checks.verify import verify
    from export.trtllm.convert import convert
    from tests.trtllm_helpers import rank_tensors

    cfg = parallel_config()
    src = checkpoint(tmp_path, cfg, seed=5)
    (src / "tokenizer.json").write_text(
        '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}')
    res = convert(src, tmp_path / "engine", tp=tp, progress=False)
    assert res.manifest.source_path == str(src.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".widen-")]  # scratch removed
    trt_cfg = json.loads((tmp_path / "engine/checkpoint/config.json").read_text())
    assert trt_cfg["layer_configs"][1] == {"attention": {"impl": "no_op", "num_key_value_heads": None},
                                           "ffn": {"impl": "mlp", "intermediate_size": 768 + 512}}
    # rank files: each rank's shard of the wide FFN, gate rows = branch rows x branch norm (folded)
    w = {n: CheckpointReader(src).get(n) for n in CheckpointReader(src).names()}
    p = "model.layers.1.parallel_blocks."
    gate = torch.cat([w[p + f"{k}.mlp.gate_proj.weight"] * w[p + f"{k}.post_attention_layernorm.weight"]
                      for k in (0, 1)])
    down = torch.cat([w[p + f"{k}.mlp.down_proj.weight"] for k in (0, 1)], dim=1)
    rows = gate.shape[0] // tp
    for r in range(tp):
        t = rank_tensors(tmp_path / "engine/checkpoint", r)
        torch.testing.assert_close(t["transformer.layers.1.ffn.fc.weight"], gate[r * rows:(r + 1) * rows])
        torch.testing.assert_close(t["transformer.layers.1.ffn.proj.weight"], down[:, r * rows:(r + 1) * rows])
        assert torch.equal(t["transformer.layers.1.post_layernorm.weight"], torch.ones(HIDDEN))
    check = verify(tmp_path / "engine", src)  # the rank files against the parallel-blocks source itself
    assert check.passed and check.max_abs_diff <= 1e-4, check.summary()


def test_convert_dry_run_plans_the_wide_ffn(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(parallel_config()))
    assert main(["convert", "--dry-run", str(tmp_path / "config.json"), "--tp", "2", "--summary"]) == 0
    assert "match `inspect`" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps(parallel_config(with_attention=True)))
    assert main(["convert", "--dry-run", str(tmp_path / "config.json"), "--tp", "2"]) == 2
    assert "layer 1: field 'parallel_blocks'" in capsys.readouterr().err


def _branch_as_plain_checkpoint(tmp_path, src, spec, layer: int, k: int):
    """A plain model whose layer `layer` is branch k of `src` (weights renamed): block_k alone."""
    from dataclasses import replace

    from export.io.writer import HFCheckpointWriter, write_config

    plain = replace(spec, layers=(*spec.layers[:layer], spec.layers[layer].branches[k], *spec.layers[layer + 1:]))
    r = CheckpointReader(src)
    out = tmp_path / f"branch{k}"
    out.mkdir()
    refs = model_tensors(plain)
    w = HFCheckpointWriter(out, [(ref.hf_name, torch.float32, ref.shape) for ref in refs], 5 << 30)
    for ref in refs:
        name = ref.hf_name.replace(f"model.layers.{layer}.", f"model.layers.{layer}.parallel_blocks.{k}.") \
            if ref.layer == layer else r.hf_name(ref)
        w.write(ref.hf_name, r.get(name))
    w.close()
    write_config(out, plain.to_hf_config())
    return load_decoder(HFRankWeights(CheckpointReader(out), plain, Mapping(), 0))


def test_runtime_runs_attention_branches_exactly_with_a_cache(tmp_path):
    """sum_k block_k(x) - (n-1) x with each block_k run as an ordinary layer; prefill + cached
    decode agree with the full forward."""
    from export.runtime.steps import Decode, Prefill, Stepper

    cfg = parallel_config(with_attention=True)
    cfg["block_configs"][1]["parallel_blocks"].append(block(v1_attention(4), v1_ffn(None)))  # attention-only
    spec = parse_hf_config(cfg)
    assert spec.layers[1].short() == "P[A2/F256 + -/F512 + A4/-]" and spec.layers[1].sync_points() == 2
    src = checkpoint(tmp_path, cfg, seed=9)
    dec = load_decoder(HFRankWeights(CheckpointReader(src), spec, Mapping(), 0))
    x = torch.randn(2, 6, HIDDEN)
    blocks = [_branch_as_plain_checkpoint(tmp_path, src, spec, 1, k).block(1, x) for k in range(3)]
    torch.testing.assert_close(dec.block(1, x), sum(blocks) - 2 * x, rtol=1e-5, atol=1e-5)
    seq = [3, 1, 4, 1, 5, 9, 2]
    with torch.inference_mode():
        full = dec(torch.tensor([seq]))[0]
    st = Stepper(dec)
    last = st.run(Prefill((0,), (tuple(seq[:3]),)))
    assert (last[0] - full[2]).abs().max() <= 1e-4
    for j in range(3, len(seq)):
        out = st.run(Decode((0,), (seq[j],)))
        assert (out[0] - full[j]).abs().max() <= 1e-4


@pytest.mark.slow
def test_parallel_blocks_under_tensor_parallelism_match_tp1(tmp_path):
    """tp=2 ranks (real processes and collectives) give tp=1's logits for attention + MLP branches."""
    from export.runtime.engine import Engine

    cfg = parallel_config(with_attention=True)
    src = checkpoint(tmp_path, cfg, seed=11)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    with Engine.start(src, tp=1, pp=1) as one:
        want = one.logits(prompts)
    with Engine.start(src, tp=2, pp=1) as two:
        got = two.logits(prompts)
    for i, p in enumerate(prompts):
        assert (got[i, :len(p)] - want[i, :len(p)]).abs().max() <= 1e-4


@pytest.mark.parametrize("command", ["inspect", "fuse", "convert"])
def test_cli_refuses_a_puzzletron_field_in_one_line_and_writes_nothing(tmp_path, capsys, command):
    src = checkpoint(tmp_path, v1_config())
    cfg = _set(v1_config(), 2, "ffn", "moe", {"num_local_experts": 4, "num_experts_per_tok": 1})
    (src / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "plan.json").write_text(json.dumps(FusionPlan([(1, 3)]).to_json()))
    argv = {"inspect": ["inspect", str(src)],
            "fuse": ["fuse", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")],
            "convert": ["convert", str(src), "--tp", "1", "--out", str(tmp_path / "out")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer 2 ffn: field 'moe'" in err[0] and "mixture-of-experts" in err[0]
    assert not (tmp_path / "out").exists()


# ---- ONNX: plain MLPs, attention-free parallel blocks as their wide FFN -------------------------
def test_onnx_runs_plain_mlps_and_parallel_blocks_like_the_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from export.onnx.export import export_onnx
    from export.runtime.engine import Engine

    src = checkpoint(tmp_path, v1_config(plain_layer=2), seed=4)
    res = export_onnx(src, tmp_path / "onnx", progress=False)
    # the exported config keeps the Puzzletron schema too
    assert read_config_json(tmp_path / "onnx")["block_configs"][2]["ffn"]["gated"] is False
    seqs = [[1, 5, 7, 9], [4, 2]]
    with Engine.start(src) as ref, Engine.start(res.out, runtime="onnx") as ort:
        assert (ref.logits(seqs) - ort.logits(seqs)).abs().max().item() <= 1e-4
    par = checkpoint(tmp_path, parallel_config(), name="par", seed=6)  # exported as its wide FFN
    res = export_onnx(par, tmp_path / "onnx-par", progress=False)
    assert res.source == par and not [p for p in tmp_path.iterdir() if p.name.startswith(".widen-")]
    with Engine.start(par) as ref, Engine.start(res.out, runtime="onnx") as ort:
        assert (ref.logits(seqs) - ort.logits(seqs)).abs().max().item() <= 1e-4
    att = checkpoint(tmp_path, parallel_config(with_attention=True), name="att")
    with pytest.raises(ExportError, match=r"layer 1: field 'parallel_blocks'.*branch 0 \(A2/F256\).*ONNX"):
        export_onnx(att, tmp_path / "onnx2", progress=False)
    assert not (tmp_path / "onnx2").exists()


def test_schema_of_a_puzzletron_config_without_any_mlp_is_still_puzzletron():
    cfg = puzzletron_config([block(v2_attention(2), v2_ffn(None)), block(v2_attention(4), v2_ffn(None))])
    spec = parse_hf_config(cfg)
    assert spec.block_schema.name == "puzzletron"
    assert spec.to_hf_config()["block_configs"] == cfg["block_configs"]


def test_mixed_plain_and_swiglu_branches_are_not_widened():
    cfg = parallel_config()
    cfg["block_configs"][1]["parallel_blocks"][1]["ffn"]["gated"] = False
    spec = parse_hf_config(cfg)
    assert spec.widened().layers[1].is_parallel  # left as it is; convert refuses the plain MLP by name
    with pytest.raises(ConfigError, match=r"layer 1 parallel_blocks\.1 ffn: field 'gated' = false"):
        spec.refuse_unsupported("TensorRT-LLM", ffn_only_parallel_ok=True)


# ---- end to end: inspect -> fuse -> convert -> verify -> generate -----------------------------
@pytest.mark.slow
def test_puzzletron_checkpoint_end_to_end_through_the_cli(tmp_path, capsys):
    """A v2 Puzzletron checkpoint (per-block num_key_value_heads, weights_precision, its top-level
    fields) with a parallel_blocks layer and an attention-free run: every command honours it and
    every HF config written along the way is in its schema."""
    from tests.conftest import write_tokenizer

    blocks = [block(v2_attention(2), v2_ffn(256)),
              {"attention": None, "ffn": None,
               "parallel_blocks": [block(v2_attention(None), v2_ffn(512)), block(v2_attention(None), v2_ffn(256))]},
              block(v2_attention(None), v2_ffn(768)), block(v2_attention(None), v2_ffn(512)),
              block(v2_attention(None), v2_ffn(256)), block(v2_attention(4), v2_ffn(512))]
    cfg = puzzletron_config(blocks)
    src = checkpoint(tmp_path, cfg, seed=21)
    write_tokenizer(src)
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "P[-/F512 + -/F256]" in out and "parallel blocks          layer 1: 2 branches" in out
    (tmp_path / "plan.json").write_text(json.dumps(FusionPlan([(2, 4)]).to_json()))
    fused = tmp_path / "fused"
    assert main(["fuse", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(fused)]) == 0
    written = read_config_json(fused)
    assert_same_schema(written, cfg)
    assert written["block_configs"][1] == cfg["block_configs"][1]  # the parallel layer, as the source wrote it
    assert written["block_configs"][2]["ffn"]["intermediate_size"] == 768 + 512 + 256
    engine = tmp_path / "engines" / "tiny"
    assert main(["convert", str(fused), "--tp", "2", "--out", str(engine)]) == 0
    assert main(["verify", str(engine), "--against", str(fused)]) == 0
    capsys.readouterr()
    assert main(["generate", str(engine), "a b a", "--max-tokens", "4", "--ignore-eos", "--no-echo"]) == 0
    direct = capsys.readouterr().out.rstrip("\n")
    # served: the engine dir packaged and queried through the real tritonserver (ensemble, gRPC streaming)
    from export.triton.client import Request, query
    from export.triton.server import start_server

    assert main(["package", str(engine), "--out", str(tmp_path / "repo")]) == 0
    with start_server(tmp_path / "repo", timeout=240) as server:
        served = query(Request("a b a", max_tokens=4, stream=True), url=server.grpc_url)
    assert served.tokens == 4 and served.text == direct


def test_kv_cache_accounting_includes_attention_branches():
    from export.layout import rank_kv_bytes_per_token

    spec = parse_hf_config(parallel_config(with_attention=True))
    per = 2 * (HIDDEN // HEADS) * 4  # k and v, fp32
    assert spec.kv_cache_bytes_per_token() == (2 + 2 + 4) * per  # layer 0, branch 1.0, layer 5
    assert rank_kv_bytes_per_token(spec, Mapping(), 0) == spec.kv_cache_bytes_per_token()


def test_a_puzzletron_config_without_head_dim_is_ambiguous_and_refused():
    cfg = v2_config()
    del cfg["head_dim"]
    with pytest.raises(ConfigError, match="field 'head_dim' is missing: Puzzletron's DeciLMConfig then uses 128"):
        parse_hf_config(cfg)
    cfg["head_dim"] = None  # null: every reader takes hidden // heads
    assert parse_hf_config(cfg).head_dim == HIDDEN // HEADS


@pytest.mark.parametrize("which", ["plain", "parallel"])
def test_torch_fast_runtime_matches_reference_on_puzzletron_layers(tmp_path, which):
    """Plain (gated: false) MLPs run fused-free in torch-fast; parallel_blocks layers (with an
    attention branch, cached) run through the reference block on the same cache."""
    from export.runtime.steps import Decode, Prefill, Reserve

    cfg = v1_config(plain_layer=2) if which == "plain" else parallel_config(with_attention=True)
    src = checkpoint(tmp_path, cfg, seed=5)
    got = {}
    for rt in ("torch", "torch-fast"):
        with Engine.start(src, runtime=rt) as eng:
            call = eng.backend.call
            call(Reserve(2, 32))
            out = [call(Prefill((0, 1), ((1, 5, 7, 9), (4, 2))))[0]]
            out += [call(Decode((0, 1), (s, s + 1)))[0] for s in range(4)]
            got[rt] = torch.stack(out)
    assert (got["torch"] - got["torch-fast"]).abs().max().item() <= 1e-4

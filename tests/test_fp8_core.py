"""FP8 (ModelOpt per-tensor) as part of the model description: numerics, config parsing, the
validated reader, and the reference runtime's emulated FP8 GEMMs and KV cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import hetero_spec
from safetensors.torch import load_file, save_file

from export import fp8
from export.errors import CheckpointError, ConfigError
from export.mapping import Mapping
from export.quantization import Quantization, parse_quantization
from export.runtime.model import load_decoder
from export.sources import open_source
from export.spec import ModelSpec
from export.synthetic import write_random_checkpoint
from export.tensors import Role, ScaleKind, ScaleRef, is_fp8, model_tensors, scale_refs

FP8_KV = Quantization("FP8", "FP8", ("lm_head",))


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "ckpt"
    return write_random_checkpoint(path, hetero_spec("bfloat16").with_quant(FP8_KV))


# ---- numerics ------------------------------------------------------------------------------
def test_quantize_saturates_and_rounds_to_the_e4m3_grid():
    q = fp8.quantize(torch.tensor([1e9, -1e9, float("inf"), 0.0, 1.0625]), 1.0)
    assert q.float().tolist() == [448.0, -448.0, 448.0, 0.0, 1.0]  # 1.0625: halfway, to even
    assert fp8.scale_for(0.0) > 0 and fp8.scale_for(448.0) == 1.0
    with pytest.raises(ValueError):
        fp8.scale_for(float("nan"))


def test_round_trip_error_is_within_half_an_e4m3_step():
    x = torch.randn(10_000) * 3
    s = fp8.scale_for(x.abs().max())
    err = (fp8.round_trip(x, s) - x).abs() / x.abs().clamp_min(s * 2 ** -6)
    assert float(err.max()) <= 2 ** -4 + 1e-6  # 3 mantissa bits: relative half-step 1/16


def test_requantize_is_exact_at_equal_scales_and_bounded_otherwise():
    q = fp8.quantize(torch.randn(256), 0.01)
    assert torch.equal(fp8.requantize(q, 0.01, 0.01).float(), q.float())
    r = fp8.requantize(q, 0.01, 0.03)
    assert float((fp8.dequantize(r, 0.03) - fp8.dequantize(q, 0.01)).abs().max()) <= 0.03 * 16


def test_fp8_linear_is_quantized_input_times_e4m3_weight():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    ws, xs = fp8.scale_for(w.abs().max()), fp8.scale_for(x.abs().max())
    wq = fp8.quantize(w, ws).float()
    want = (fp8.round_trip(x, xs) @ (wq * ws).T)
    assert torch.allclose(fp8.fp8_linear(x, wq, ws, xs), want, rtol=1e-5, atol=1e-6)


# ---- the description -----------------------------------------------------------------------
def test_quant_config_round_trips_through_config_json_and_hf_quant_config(fp8_ckpt):
    spec = ModelSpec.load(fp8_ckpt)
    assert spec.quant == FP8_KV
    cfg = json.loads((fp8_ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert json.loads((fp8_ckpt / "hf_quant_config.json").read_text())["quantization"] == {
        "quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}


@pytest.mark.parametrize("hf, qc, msg", [
    ({"quantization": {"quant_algo": "NVFP4"}}, None, "'quant_algo' is 'NVFP4'"),
    ({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"}}, None, "kv_cache_quant_algo"),
    ({"quantization": {"quant_algo": "FP8", "exclude_modules": "lm_head"}}, None, "exclude_modules"),
    ({"quantization": {"quant_algo": "FP8"}}, {"quant_method": "modelopt", "quant_algo": "FP8",
                                               "kv_cache_quant_algo": "FP8"}, "must agree"),
    (None, {"quant_method": "gptq", "bits": 4}, "quant_method"),
    ({"quant_algo": "FP8"}, None, "field 'quantization'"),
])
def test_bad_quant_configs_are_refused_by_field(hf, qc, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_quantization(hf, qc, "config.json")


def test_exclude_patterns_match_modules_wildcards_and_prefixes():
    spec = hetero_spec().with_quant(Quantization("FP8", None, ("lm_head", "model.layers.0", "*down_proj")))
    fp8_roles = {(r.role, r.layer) for r in model_tensors(spec) if is_fp8(spec, r)}
    assert (Role.LM_HEAD, None) not in fp8_roles and not any(layer == 0 for _, layer in fp8_roles)
    assert not any(role is Role.DOWN for role, _ in fp8_roles) and (Role.Q, 1) in fp8_roles
    assert not any(is_fp8(spec, r) for r in model_tensors(spec) if r.role in (Role.EMBED, Role.ATTN_NORM))


# ---- the reader: bad FP8 checkpoints, one line each ---------------------------------------
def _edit(src, dst, change):
    import shutil
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f)
    return dst


def _first_scale(spec, kind):
    return next(s for s in scale_refs(spec) if s.kind is kind).name


@pytest.mark.parametrize("case", ["missing", "zero", "nan", "negative", "shape", "weight_bf16", "kv_missing"])
def test_bad_fp8_tensors_are_refused_naming_the_tensor(fp8_ckpt, tmp_path, case):
    spec = ModelSpec.load(fp8_ckpt)
    ws, kv = _first_scale(spec, ScaleKind.WEIGHT), _first_scale(spec, ScaleKind.K)
    weight = ws.removesuffix("_scale")
    changes = {
        "missing": (lambda t: t.pop(ws), f"missing tensor {ws}"),
        "zero": (lambda t: t.__setitem__(ws, torch.tensor(0.0)), "finite scale > 0"),
        "nan": (lambda t: t.__setitem__(ws, torch.tensor(math.nan)), "finite scale > 0"),
        "negative": (lambda t: t.__setitem__(ws, torch.tensor(-1.0)), "finite scale > 0"),
        "shape": (lambda t: t.__setitem__(ws, torch.ones(4)), "per-tensor scale"),
        "weight_bf16": (lambda t: t.__setitem__(weight, t[weight].to(torch.bfloat16)), "expected float8_e4m3fn"),
        "kv_missing": (lambda t: t.pop(kv), f"missing tensor {kv}"),
    }
    change, msg = changes[case]
    bad = _edit(fp8_ckpt, tmp_path / case, change)
    with pytest.raises(CheckpointError, match=msg) as e:
        open_source(bad)
    assert (weight if case != "kv_missing" else kv).split(".")[2] in str(e.value)  # names the layer


def test_kv_scales_name_variants_are_read(fp8_ckpt, tmp_path):
    spec = ModelSpec.load(fp8_ckpt)
    k = next(s for s in scale_refs(spec) if s.kind is ScaleKind.K)
    vllm_name = k.names[1]
    bad = _edit(fp8_ckpt, tmp_path / "vllm", lambda t: t.__setitem__(vllm_name, t.pop(k.name)))
    weights = open_source(bad).rank_weights(Mapping(1, 1), 0)
    assert weights.scale(k) == open_source(fp8_ckpt).rank_weights(Mapping(1, 1), 0).scale(k)
    both = _edit(bad, tmp_path / "both", lambda t: t.__setitem__(k.name, t[vllm_name].clone()))
    with pytest.raises(CheckpointError, match="stored twice"):
        open_source(both)


# ---- the runtime's emulation ------------------------------------------------------------------
def _dequantized_reference(fp8_ckpt, tmp_path):
    """The same model with every FP8 weight dequantized to fp32 and no quantization: the FP8 run
    differs from it only by the activation and KV rounding."""
    spec = ModelSpec.load(fp8_ckpt)
    tensors = load_file(fp8_ckpt / "model.safetensors")
    out = {}
    for ref in model_tensors(spec):
        t = tensors[ref.hf_name]
        if is_fp8(spec, ref):
            t = fp8.dequantize(t, tensors[ScaleRef(ScaleKind.WEIGHT, ref.role, ref.layer, ref.branch).name])
        out[ref.hf_name] = t.float()
    plain = spec.with_quant(Quantization()).with_dtype("float32")
    (tmp_path / "deq").mkdir()
    save_file(out, tmp_path / "deq" / "model.safetensors")
    (tmp_path / "deq" / "config.json").write_text(json.dumps(plain.to_hf_config()))
    return tmp_path / "deq"


def test_emulated_fp8_matches_an_independent_emulation_and_stays_near_dequantized(fp8_ckpt, tmp_path):
    src = open_source(fp8_ckpt)
    dec = load_decoder(src.rank_weights(Mapping(1, 1), 0))
    ids = torch.randint(0, src.spec.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = dec(ids)
        deq = load_decoder(open_source(_dequantized_reference(fp8_ckpt, tmp_path)).rank_weights(Mapping(1, 1), 0))
        # an independent emulation: round every linear input and every k/v to its FP8 grid by hand
        dec_scales, kv = dict(dec._fp8), dict(dec._kv_scale)

        def rounded_linear(self, x, role, layer=None, branch=None):
            key = (role, layer) if branch is None else (role, layer, branch)
            if key in dec_scales:
                x = fp8.round_trip(x, dec_scales[key][1])
            return torch.nn.functional.linear(x, self.w(role, layer, branch))
        deq._kv_scale = kv
        deq.linear = rounded_linear.__get__(deq)
        want = deq(ids)
    assert float((got - want).abs().max()) < 1e-4
    assert src.spec.quant.fp8_kv and len(dec._kv_scale) == len(src.spec.attention_layers())


def test_fp8_decoder_at_tp2_equals_tp1_rank_pieces(fp8_ckpt):
    """Per-tensor scales are the same on every rank: each rank's scales equal tp1's."""
    src = open_source(fp8_ckpt)
    one = load_decoder(src.rank_weights(Mapping(1, 1), 0))
    for rank in range(2):
        part = load_decoder(src.rank_weights(Mapping(2, 1), rank))
        assert part._fp8 == one._fp8 and part._kv_scale == one._kv_scale

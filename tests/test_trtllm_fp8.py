"""HF FP8 (ModelOpt) -> TensorRT-LLM 1.2.1 FP8 checkpoint: every tensor's name, shape and dtype
against the format (docs/fp8.md), the round trip through verify, bad FP8 rank files
refused, and the trtllm-build flags for FP8."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export import fp8
from export.checks.verify import verify
from export.cli import main
from export.engine_dir import EngineDir
from export.errors import CheckpointError, ConfigError, ExportError
from export.mapping import Mapping
from export.quantization import Quantization
from export.runtime.model import load_decoder
from export.sources import open_source
from export.tensors import LINEAR_ROLES, Role, ScaleKind, ScaleRef, is_fp8, model_tensors
from export.trtllm.build import trtllm_build_args
from export.trtllm.config import parse_trtllm_config, trtllm_config
from export.trtllm.convert import convert
from export.trtllm.packed_scales import RequantizedWeights
from tests.conftest import hetero_spec
from tests.trtllm_helpers import make_source, rank_tensors

FP8_KV = Quantization("FP8", "FP8", ("lm_head",))
SLOW = pytest.mark.slow  # tp * pp > 1 verifies in worker processes

# The format, written out from the TRT-LLM sources (not from our tables): per layer kind of the
# hetero description, the module names a rank file holds and whether each is an FP8 linear.
# layers: 0,1 full attention + FFN; 2,3,4 FFN only; 5 attention only; 6 linear replacements; 7 empty.
FP8_MODULES = {0: ["attention.qkv", "attention.dense", "ffn.fc", "ffn.gate", "ffn.proj"],
               2: ["ffn.fc", "ffn.gate", "ffn.proj"], 5: ["attention.qkv", "attention.dense"],
               6: ["attention", "ffn"], 7: []}
FP8_MODULES[1], FP8_MODULES[3], FP8_MODULES[4] = FP8_MODULES[0], FP8_MODULES[2], FP8_MODULES[2]
KV_LAYERS = (0, 1, 5)  # full attention: kv_cache_quantize adds the KV scales to `Attention` modules only


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("fp8src") / "ckpt", hetero_spec("bfloat16").with_quant(FP8_KV))


@pytest.fixture(scope="module")
def tp2(src, tmp_path_factory) -> Path:
    return convert(src, tmp_path_factory.mktemp("fp8tp2") / "eng", tp=2, progress=False).out


def _all(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- the format -----------------------------------------------------------------------------
def test_config_quantization_is_trtllm_quant_config(tp2):
    cfg = json.loads((tp2 / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    assert cfg["dtype"] == "bfloat16"  # activations and excluded linears stay in the model dtype
    # the manifest records what the checkpoint itself reads back as (what `package` checks)
    assert EngineDir(tp2).quantization == open_source(tp2).spec.quant == FP8_KV


def test_every_rank_tensor_name_shape_and_dtype(src, tp2):
    ckpt, source = tp2 / "checkpoint", _all(src)
    ranks = [rank_tensors(ckpt, r) for r in range(2)]
    for t in ranks:
        want: set[str] = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
        for layer, modules in FP8_MODULES.items():
            pre = f"transformer.layers.{layer}."
            for m in modules:
                want |= {pre + m + suffix for suffix in (".weight", ".weights_scaling_factor",
                                                         ".activation_scaling_factor")}
                assert t[pre + m + ".weight"].dtype == torch.float8_e4m3fn
                for s in ("weights_scaling_factor", "activation_scaling_factor"):
                    assert t[pre + m + "." + s].shape == (1,) and t[pre + m + "." + s].dtype == torch.float32
            if layer in KV_LAYERS:
                kv, rcp = pre + "attention.kv_cache_scaling_factor", pre + "attention.kv_cache_rcp_scaling_factor"
                want |= {kv, rcp}
                assert t[kv].shape == t[rcp].shape == (1,) and t[kv].dtype == t[rcp].dtype == torch.float32
                assert math.isclose(float(t[rcp]) * float(t[kv]), 1.0, rel_tol=1e-6)
                k, v = (source[f"model.layers.{layer}.self_attn.{p}_proj.{p}_scale"] for p in "kv")
                assert float(t[kv]) == float(torch.max(k, v))  # TRT-LLM keeps max(k_scale, v_scale)
            norms = (["input_layernorm"] if layer in (0, 1, 5, 6) else []) + (["post_layernorm"] if layer != 5 and
                                                                                layer != 7 else [])
            want |= {pre + n + ".weight" for n in norms}
        assert set(t) == want
        for name in ("lm_head.weight", "transformer.vocab_embedding.weight", "transformer.ln_f.weight"):
            assert t[name].dtype == torch.bfloat16  # excluded (lm_head) or never quantized
    for name in ranks[0]:
        if name.endswith("scaling_factor"):  # per-tensor: the same on every tp rank
            assert torch.equal(ranks[0][name], ranks[1][name]), name


def test_qkv_scales_are_the_max_and_parts_are_requantized_to_it(src, tp2):
    source, t = _all(src), rank_tensors(tp2 / "checkpoint", 0)
    pre = "model.layers.1.self_attn."
    ws = {p: float(source[f"{pre}{p}_proj.weight_scale"]) for p in "qkv"}
    xs = {p: float(source[f"{pre}{p}_proj.input_scale"]) for p in "qkv"}
    qkv = "transformer.layers.1.attention.qkv."
    assert float(t[qkv + "weights_scaling_factor"]) == pytest.approx(max(ws.values()), rel=1e-7)
    assert float(t[qkv + "activation_scaling_factor"]) == pytest.approx(max(xs.values()), rel=1e-7)
    q_rows = source[f"{pre}q_proj.weight"].shape[0] // 2  # tp rank 0's half of the heads
    want = fp8.quantize(source[f"{pre}q_proj.weight"][:q_rows].float() * ws["q"], max(ws.values()))
    assert torch.equal(t[qkv + "weight"][:q_rows].view(torch.uint8), want.view(torch.uint8))


def test_equal_qkv_scales_convert_exactly(src, tmp_path):
    """As ModelOpt writes them (q/k/v share a scale): the rank file holds the source bytes."""
    eq = tmp_path / "eq"
    shutil.copytree(src, eq)
    for f in eq.glob("*.safetensors"):
        t = load_file(f)
        for name in [n for n in t if n.endswith(("k_proj.weight_scale", "v_proj.weight_scale"))]:
            t[name] = _all(src)[name.replace("k_proj", "q_proj").replace("v_proj", "q_proj")].clone()
        save_file(t, f)
    res = convert(eq, tmp_path / "eng", tp=1, progress=False)
    assert res.requant is not None and not res.requant.layers
    source, t = _all(eq), rank_tensors(tmp_path / "eng" / "checkpoint", 0)
    parts = [source[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(t["transformer.layers.0.attention.qkv.weight"].view(torch.uint8),
                       torch.cat(parts).view(torch.uint8))
    assert res.manifest.engines["cpu"]["fp8"]["requantized_layers"] == []


def test_config_round_trip_keeps_which_linears_are_fp8():
    spec = hetero_spec("bfloat16").with_quant(Quantization("FP8", None, ("lm_head", "*.mlp.down_proj")))
    for m in (Mapping(1), Mapping(2, 2)):
        back, _ = parse_trtllm_config(json.loads(json.dumps(trtllm_config(spec, m, "bfloat16"))))
        assert back.quant.fp8 and not back.quant.fp8_kv
        assert [is_fp8(back, r) for r in model_tensors(back)] == [is_fp8(spec, r) for r in model_tensors(spec)]
    assert trtllm_config(spec, Mapping(1), "bfloat16")["quantization"]["exclude_modules"] == [
        "lm_head", *[f"transformer.layers.{i}.ffn.proj" for i in range(5)]]


def test_rank_files_run_as_the_requantized_source(src, tp2, tmp_path):
    """In process, tp 1: the decoder on the rank files equals the decoder on the HF source with
    q/k/v requantized as convert does (the same emulated FP8 math)."""
    one = convert(src, tmp_path / "tp1", tp=1, progress=False).out
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    hf = open_source(src)
    with torch.inference_mode():
        got = load_decoder(open_source(one).rank_weights(Mapping(1), 0))(ids)
        want = load_decoder(RequantizedWeights(hf.rank_weights(Mapping(1), 0), hf.spec))(ids)
    assert float((got - want).abs().max()) < 1e-5


# ---- the round trip through verify ------------------------------------------------------------
@pytest.mark.parametrize("tp, pp", [(1, 1), pytest.param(2, 1, marks=SLOW), pytest.param(4, 1, marks=SLOW),
                                    pytest.param(1, 2, marks=SLOW)])
def test_round_trip_verifies_strictly(src, tmp_path, tp, pp):
    eng = convert(src, tmp_path / "eng", tp=tp, pp=pp, progress=False).out
    res = verify(eng, src)
    assert res.passed and res.tolerance == 1e-4 and res.max_abs_diff < 1e-4, res.summary()
    assert res.fp8["requantized_layers"] == [0, 1, 5] and res.fp8["requant_logits_diff"] > 0
    assert "requantized" in res.summary()


@SLOW
def test_verify_reports_fp8_vs_bf16_quality(tmp_path):
    """A bf16 model, its FP8 copy (weights rounded to E4M3 at amax/448): KL and top-1 against it."""
    bf16 = make_source(tmp_path / "bf16", hetero_spec("bfloat16"))
    q = tmp_path / "fp8"
    shutil.copytree(bf16, q)
    spec = hetero_spec("bfloat16").with_quant(Quantization("FP8", None, ("lm_head",)))
    t = _all(bf16)
    for f in [*q.glob("*.safetensors"), q / "model.safetensors.index.json"]:
        f.unlink()
    out = {}
    for ref in model_tensors(spec):
        w = t[ref.hf_name]
        if is_fp8(spec, ref):
            s = fp8.scale_for(w.float().abs().max())
            out[ref.hf_name] = fp8.quantize(w, s)
            out[ScaleRef(ScaleKind.WEIGHT, ref.role, ref.layer).name] = torch.tensor(s)
            out[ScaleRef(ScaleKind.INPUT, ref.role, ref.layer).name] = torch.tensor(8.0 / 448)
        else:
            out[ref.hf_name] = w
    save_file(out, q / "model.safetensors")
    (q / "config.json").write_text(json.dumps(spec.to_hf_config()))
    (q / "hf_quant_config.json").write_text(json.dumps(spec.quant.hf_quant_config()))
    eng = convert(q, tmp_path / "eng", tp=2, progress=False).out
    res = verify(eng, q, bf16_reference=bf16)
    quality = res.fp8["quality"]
    assert res.passed and 0 <= quality["kl"] < 0.05 and quality["top1_agreement"] > 0.7, res.summary()
    assert "top-1 agreement" in res.summary()


# ---- refused ------------------------------------------------------------------------------
def _edit_rank(eng: Path, tmp_path: Path, change, rank: int = 0) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(eng, bad)
    f = bad / "checkpoint" / f"rank{rank}.safetensors"
    t = load_file(f)
    change(t)
    save_file(t, f)
    return bad


SCALE = "transformer.layers.0.attention.qkv.weights_scaling_factor"
KV = "transformer.layers.0.attention.kv_cache_scaling_factor"
RCP = "transformer.layers.0.attention.kv_cache_rcp_scaling_factor"
WEIGHT = "transformer.layers.0.ffn.fc.weight"


@pytest.mark.parametrize("case, change, msg", [
    ("missing", lambda t: t.pop(SCALE), f"missing tensor {SCALE}"),
    ("zero", lambda t: t.__setitem__(SCALE, torch.zeros(1)), "expected a finite scale > 0"),
    ("nan", lambda t: t.__setitem__(SCALE, torch.tensor([math.nan])), "expected a finite scale > 0"),
    ("negative", lambda t: t.__setitem__(SCALE, -t[SCALE]), "expected a finite scale > 0"),
    ("shape", lambda t: t.__setitem__(SCALE, t[SCALE].repeat(2)), "expected [1] float32"),
    ("other_rank", lambda t: t.__setitem__(SCALE, t[SCALE] * 2), "same on every tp rank"),
    ("rcp", lambda t: t.__setitem__(RCP, t[RCP] * 2), "expected 1 / kv_cache_scaling_factor"),
    ("kv_missing", lambda t: t.pop(KV), f"missing tensor {KV}"),
    ("weight_bf16", lambda t: t.__setitem__(WEIGHT, t[WEIGHT].to(torch.bfloat16)), "expected [128, 64] float8_e4m3fn"),
])
def test_bad_fp8_rank_files_are_refused_naming_the_tensor(tp2, tmp_path, case, change, msg):
    bad = _edit_rank(tp2, tmp_path, change, rank=1 if case == "other_rank" else 0)
    with pytest.raises(CheckpointError) as e:
        open_source(bad)
    # a wrong reciprocal on one rank is also a scale that differs between the ranks
    assert msg in str(e.value) and len(e.value.problems) == (2 if case == "rcp" else 1), e.value.problems


def test_config_quantization_disagreeing_with_the_tensors_is_refused(tp2, tmp_path):
    bad = tmp_path / "noquant"
    shutil.copytree(tp2, bad)
    cfg_path = bad / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization"] = {"quant_algo": None, "kv_cache_quant_algo": None}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"float8_e4m3fn, expected \[.*\] bfloat16"):
        open_source(bad)
    cfg["quantization"] = {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quant_algo' is 'W4A16_AWQ'"):
        open_source(bad)


def test_convert_does_not_quantize(tmp_path, capsys):
    bf16 = make_source(tmp_path / "bf16", hetero_spec("bfloat16"))
    assert main(["convert", str(bf16), "--tp", "1", "--dtype", "fp8", "--out", str(tmp_path / "eng"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "python -m export quantize" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "eng").exists()


def test_a_layer_specific_exclude_that_pp_cannot_express_is_refused(tmp_path):
    spec = hetero_spec("bfloat16").with_quant(Quantization("FP8", None, ("lm_head", "model.layers.0.mlp.down_proj")))
    source = make_source(tmp_path / "src", spec)
    with pytest.raises(ExportError, match=r"model\.layers\.4\.mlp\.down_proj is FP8 but TRT-LLM module "
                                          r"transformer\.layers\.0\.ffn\.proj"):
        convert(source, tmp_path / "eng", tp=1, pp=2, progress=False)
    assert not (tmp_path / "eng").exists()
    convert(source, tmp_path / "eng1", tp=2, pp=1, progress=False)  # one stage: expressible


def test_mixed_qkv_quantization_is_refused(tmp_path):
    spec = hetero_spec("bfloat16").with_quant(Quantization("FP8", None, ("lm_head", "*.k_proj")))
    with pytest.raises(ExportError, match="q/k/v must be quantized alike"):
        convert(make_source(tmp_path / "src", spec), tmp_path / "eng", tp=1, progress=False)


# ---- trtllm-build (command line only: trtllm-build does not run here) ---------------------------
@pytest.mark.parametrize("quant, flags", [
    ({"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]},
     ["--use_fp8_context_fmha", "enable"]),
    ({"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}, []),
    ({"quant_algo": None, "kv_cache_quant_algo": None}, []),
])
def test_build_command_line_for_fp8(quant, flags):
    args = trtllm_build_args(Path("c"), Path("e"), workers=2, max_batch_size=8, max_input_len=1024,
                             max_seq_len=2048, max_num_tokens=8192, quantization=quant)
    assert args[args.index("--workers") + 2:] == flags
    assert args[args.index("--gemm_plugin") + 1] == "auto"


def test_spec_of_every_fp8_linear_is_recorded(tp2):
    spec = open_source(tp2).spec
    assert all(is_fp8(spec, r) == (r.role in LINEAR_ROLES and r.role is not Role.LM_HEAD)
               for r in model_tensors(spec))

"""Pipeline stages: TRT-LLM's uneven split everywhere (writer, runtime, inspect), and the stages
trtllm-build cannot build (no full-attention layer) refused for the TRT-LLM target only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.checks.verify import verify
from export.errors import ExportError
from export.layout import check_trtllm_stages, rank_bytes, rank_kv_bytes_per_token, trtllm_pp_values
from export.mapping import Mapping
from export.spec import ModelSpec
from export.trtllm.convert import convert
from tests.conftest import EMPTY, LINEAR, ROPE, attn_only, ffn_only, full, hetero_spec
from tests.test_spec import ULTRA as ULTRA_CONFIG  # the real Ultra-253B config: one path constant
from tests.trtllm_helpers import make_source, rank_tensors, read_all

REPO = Path(__file__).resolve().parents[1]
PUZZLE = REPO / "export" / "demo" / "models" / "puzzle"  # 12 layers; layers 3-6 have no attention


def five_layers() -> ModelSpec:
    """5 layers: at pp 2, TRT-LLM gives stage 0 layers 0-2 and stage 1 layers 3-4 (both with attention)."""
    layers = (full(2, 256), ffn_only(768), LINEAR, full(4, 512), attn_only(1))
    return ModelSpec(hidden=64, heads=8, head_dim=8, vocab=99, layers=layers, rope_theta=10000.0,
                     rope_scaling=ROPE, norm_eps=1e-5, tie_embeddings=False, dtype="float32",
                     max_position_embeddings=256)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True)


# ---- the assignment rule -------------------------------------------------------------------
def trtllm_stages(n: int, pp: int) -> list[list[int]]:
    """TRT-LLM 1.x `Mapping.pp_layers` (tensorrt_llm/mapping.py), written out independently."""
    return [t.tolist() for t in torch.tensor_split(torch.arange(n), pp)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 12, 13, 49, 80, 126, 162])
def test_pp_layers_is_trtllm_tensor_split(n):
    for pp in range(1, min(n, 20) + 1):
        for tp in (1, 2):
            m = Mapping(tp, pp)
            want = trtllm_stages(n, pp)
            assert [list(s) for s in m.stages(n)] == want
            # every rank of a stage gets that stage's layers
            assert [list(m.pp_layers(n, m.pp_rank(r))) for r in m.ranks()] == [s for s in want for _ in range(tp)]


def test_ultra_pp4_is_uneven_and_more_stages_than_layers_is_refused():
    assert [(s.start, s.stop - 1) for s in Mapping(8, 4).stages(162)] == [(0, 40), (41, 81), (82, 121), (122, 161)]
    with pytest.raises(ExportError, match="pp=6 is more stages than the 5 layers"):
        Mapping(1, 6).pp_layers(5, 0)


# ---- uneven pp through the writer and the runtime ------------------------------------------
@pytest.fixture(scope="module")
def five_source(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_source(tmp_path_factory.mktemp("five") / "src", five_layers(), seed=3)


@pytest.mark.slow
def test_convert_uneven_pp_writes_trtllm_stages_and_verifies(five_source, tmp_path):
    spec = five_layers()
    eng = convert(five_source, tmp_path / "e", tp=1, pp=2, progress=False).out
    ckpt = eng / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["mapping"] == {"world_size": 2, "tp_size": 1, "pp_size": 2}
    src = read_all(five_source)
    for rank, layers in enumerate(trtllm_stages(5, 2)):  # [0, 1, 2], [3, 4]
        tensors = rank_tensors(ckpt, rank)
        local = {int(k.split(".")[2]) for k in tensors if k.startswith("transformer.layers.")}
        assert local == set(range(len(layers)))  # local indices, restarting at 0 on each stage
        for i, g in enumerate(layers):  # the local layer i is global layer g, tensor for tensor
            if spec.layers[g].has_ffn and spec.layers[g].ffn.width:
                assert torch.equal(tensors[f"transformer.layers.{i}.ffn.proj.weight"],
                                   src[f"model.layers.{g}.mlp.down_proj.weight"])
            if spec.layers[g].attention.kv_heads:
                assert torch.equal(tensors[f"transformer.layers.{i}.attention.dense.weight"],
                                   src[f"model.layers.{g}.self_attn.o_proj.weight"])
    assert "transformer.layers.1.attention.weight" not in rank_tensors(ckpt, 1)
    assert "transformer.layers.2.attention.weight" in rank_tensors(ckpt, 0)  # layer 2: linear attention
    # the reference runtime runs those rank files in 2 gloo processes (one per stage)
    res = verify(eng, five_source)
    assert res.passed and res.lossless and res.max_abs_diff <= 1e-4, res.summary()


def test_dry_run_uneven_matches_inspect(tmp_path, capsys):
    from export.cli import main
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(five_layers().to_hf_config()))
    assert main(["convert", "--dry-run", str(cfg), "--tp", "2", "--pp", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["bytes"] for r in rep["ranks"]] == [r["inspect_bytes"] for r in rep["ranks"]]
    layers = [{int(t["name"].split(".")[2]) for t in r["tensors"] if t["name"].startswith("transformer.layers.")}
              for r in rep["ranks"]]
    assert layers == [{0, 1, 2}, {0, 1, 2}, {0, 1}, {0, 1}]


# ---- stages trtllm-build cannot build --------------------------------------------------------
def test_attention_free_stage_rule():
    spec = hetero_spec()  # attention in layers 0, 1, 5; 6 is linear (no KV cache), 7 empty
    assert trtllm_pp_values(spec) == [1, 2]
    assert check_trtllm_stages(spec, Mapping(1, 2)) == []
    assert check_trtllm_stages(spec, Mapping(2, 4)) == [
        "stage 1 (layers 2-3), stage 3 (layers 6-7) have no full-attention layer, which trtllm-build "
        "cannot build (TRT-LLM needs one per pipeline stage); nearest pp that works: 2"]
    no_attention = five_layers().with_layers([ffn_only(256), EMPTY])
    assert check_trtllm_stages(no_attention, Mapping()) == [
        "stage 0 (layers 0-1) has no full-attention layer, which trtllm-build cannot build (TRT-LLM needs "
        "one per pipeline stage); no pp value works: the model has no full-attention layer"]


def test_ultra_nearest_pp_values():
    spec = ModelSpec.load(ULTRA_CONFIG)
    assert check_trtllm_stages(spec, Mapping(8, 4)) == []
    assert check_trtllm_stages(spec, Mapping(1, 8)) == [
        "stage 6 (layers 122-141) has no full-attention layer, which trtllm-build cannot build (TRT-LLM "
        "needs one per pipeline stage); nearest pp that works: 7"]


@pytest.mark.slow
def test_convert_refuses_attention_free_stage_tiny(five_source, tmp_path):
    # 5 layers at pp 3: stages 0-1, 2-3, 4; stage 1 = layers 2 (linear) and 3 (full) -> fine; pp 4: 0-1, 2, 3, 4
    with pytest.raises(ExportError, match=r"stage 1 \(layer 2\) has no full-attention layer.*nearest pp that "
                                          r"works: 3$"):
        convert(five_source, tmp_path / "e", tp=1, pp=4, progress=False)
    assert list(tmp_path.iterdir()) == []
    out = cli("convert", str(five_source), "--pp", "4", "--out", str(tmp_path / "e"))
    assert out.returncode == 2 and not (tmp_path / "e").exists()
    assert out.stderr.splitlines() == [
        "error: cannot split this model at tp=1, pp=4: stage 1 (layer 2) has no full-attention layer, which "
        "trtllm-build cannot build (TRT-LLM needs one per pipeline stage); nearest pp that works: 3"]


@pytest.mark.slow
def test_convert_refuses_demo_puzzle_at_pp4(tmp_path):
    out = cli("convert", str(PUZZLE), "--pp", "4", "--out", str(tmp_path / "e"))
    assert out.returncode == 2, out.stderr
    assert "stage 1 (layers 3-5) has no full-attention layer" in out.stderr
    assert "nearest pp that works: 3" in out.stderr and len(out.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    dry = cli("convert", "--dry-run", str(PUZZLE), "--pp", "4")
    assert dry.returncode == 2 and "stage 1 (layers 3-5)" in dry.stderr and dry.stdout == ""


# ---- inspect ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_inspect_ultra_pp4_per_stage_figures():
    out = cli("inspect", str(ULTRA_CONFIG), "--tp", "8", "--pp", "4")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "pipeline stages          4 (uneven, TRT-LLM's split: the first 2 get 41 layers, the rest 40)" in text
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit() and "GiB" in line]
    assert [r[:4] for r in rows] == [["0", "0-40", "41", "23"], ["1", "41-81", "41", "18"],
                                     ["2", "82-121", "40", "13"], ["3", "122-161", "40", "10"]]
    assert "trtllm-build             ok" in text and "stage balance            weights max/min" in text

    rep = json.loads(cli("inspect", str(ULTRA_CONFIG), "--tp", "8", "--pp", "4", "--json").stdout)
    spec, m = ModelSpec.load(ULTRA_CONFIG), Mapping(8, 4)
    stages = rep["stages"]
    assert [(s["first"], s["last"], s["layers"]) for s in stages] == [(0, 40, 41), (41, 81, 41), (82, 121, 40),
                                                                      (122, 161, 40)]
    assert [s["rank_weight_bytes"] for s in stages] == [rank_bytes(spec, m, m.rank(0, s)) for s in range(4)]
    assert sum(s["weight_bytes"] for s in stages) == sum(rep["rank_weight_bytes"])
    # KV per token: a rank caches ceil(8 / 8) = 1 kv head of each of its stage's attention layers
    assert [s["rank_kv_cache_bytes_per_token"] for s in stages] == [n * 2 * 128 * 2 for n in (23, 18, 13, 10)]
    assert sum(s["kv_cache_bytes_per_token"] for s in stages) * 1 == rep["kv_cache_bytes_per_token"]
    # the fused FFN blocks (125, 134, 143, 149) make the last stage the heaviest though it has the fewest layers
    assert max(stages, key=lambda s: s["rank_weight_bytes"])["stage"] == 3


@pytest.mark.slow
def test_inspect_puzzle_pp4_ok_for_cpu_not_trtllm():
    out = cli("inspect", str(PUZZLE), "--pp", "4")
    assert out.returncode == 2
    assert "trtllm-build             FAILS (convert refuses; the cpu engine, verify/generate, runs it):" in out.stdout
    assert "stage 1 (layers 3-5) has no full-attention layer" in out.stdout
    assert "no full attention: trtllm-build cannot build it" in out.stdout
    assert cli("inspect", str(PUZZLE), "--pp", "4", "--target", "cpu").returncode == 0
    rep = json.loads(cli("inspect", str(PUZZLE), "--pp", "4", "--json").stdout)
    assert rep["targets"]["cpu"] == {"ok": True, "problems": []}
    assert rep["targets"]["trtllm"]["ok"] is False and not rep["layout_ok"]
    assert [(s["first"], s["last"], s["attention_layers"]) for s in rep["stages"]] == [(0, 2, 3), (3, 5, 0),
                                                                                       (6, 8, 2), (9, 11, 3)]
    assert rep["stages"][1]["kv_cache_bytes_per_token"] == 0
    assert cli("inspect", str(PUZZLE), "--pp", "3").returncode == 0


def test_rank_kv_bytes_match_the_runtime_cache():
    from export.runtime.model import Decoder
    spec, m = hetero_spec(), Mapping(2, 3)
    for rank in m.ranks():
        with torch.device("meta"):
            dec = Decoder(spec, m, rank)
        assert dec.new_cache().bytes_per_token() == rank_kv_bytes_per_token(spec, m, rank)

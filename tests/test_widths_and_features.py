"""Models we should accept (any FFN width) and features we do not support named as such."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from export.errors import ConfigError, ExportError
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import FusionPlan
from export.io.reader import CheckpointReader
from export.spec import ModelSpec, parse_hf_config
from export.synthetic import llama_config, write_random_checkpoint
from tests.conftest import ffn_only, full, llama_spec


@pytest.mark.slow
def test_a_width_no_ffn_mult_expresses_is_written_as_intermediate_size(tmp_path):
    """Fusing FFNs of widths 128 + 256 gives 384: no ffn_mult gives it, so the block says
    `intermediate_size` (what vLLM's nemotron_nas loader and ours read) and it round-trips."""
    spec = ModelSpec(hidden=64, heads=4, head_dim=16, vocab=50,
                     layers=(full(2, 128), ffn_only(128), ffn_only(256), full(2, 128)), dtype="float32")
    src = write_random_checkpoint(tmp_path / "src", spec, seed=1)
    res = fuse_checkpoint(src, FusionPlan([(1, 2)]), tmp_path / "f", progress=False)
    blocks = json.loads((tmp_path / "f/config.json").read_text())["block_configs"]
    assert blocks[1]["ffn"] == {**blocks[1]["ffn"], "ffn_mult": None, "intermediate_size": 384}
    assert blocks[0]["ffn"]["intermediate_size"] == 128
    again = ModelSpec.load(tmp_path / "f")
    assert again.layers == res.after.layers and again.layers[1].ffn.width == 384
    CheckpointReader(tmp_path / "f").validate(again)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"groups": [[1, 2]]}))
    r = subprocess.run([sys.executable, "-m", "export", "fuse", str(src), "--plan", str(plan), "--out",
                        str(tmp_path / "g")], capture_output=True, text=True)
    assert r.returncode == 0 and "TensorRT-LLM's PyTorch backend reads ffn_mult only" in r.stderr, r.stderr


def test_onnx_builds_a_llama_whose_width_is_not_a_multiple_of_256(tmp_path):
    from export.onnx.export import build_onnx
    from export.trtllm.convert import convert

    spec = replace(llama_spec(), layers=(full(2, 128),) * 2)
    src = write_random_checkpoint(tmp_path / "src", spec, seed=2)
    assert json.loads((src / "config.json").read_text())["intermediate_size"] == 128
    eng = convert(src, tmp_path / "eng", tp=1, progress=False).out
    res = build_onnx(eng, progress=False)
    assert res.spec.layers[0].ffn.width == 128


def test_an_empty_plan_writes_nothing(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", llama_spec(), seed=3)
    with pytest.raises(ExportError, match="nothing to fuse"):
        fuse_checkpoint(src, FusionPlan([]), tmp_path / "f", progress=False)
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_biases_are_refused_up_front_by_name(tmp_path, key):
    cfg = llama_config(llama_spec()) | {key: True}
    with pytest.raises(ConfigError, match=f"'{key}' = True: biases are not supported"):
        parse_hf_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "export", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and f"'{key}'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_inspect_accepts_an_engine_dir(tmp_path):
    from export.trtllm.convert import convert

    src = write_random_checkpoint(tmp_path / "src", llama_spec(), seed=4)
    eng = convert(src, tmp_path / "eng", tp=2, progress=False).out
    out = subprocess.run([sys.executable, "-m", "export", "inspect", str(eng), "--tp", "2", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    direct = json.loads(subprocess.run([sys.executable, "-m", "export", "inspect", str(src), "--tp", "2", "--json"],
                                       capture_output=True, text=True).stdout)
    assert rep["parameters"] == direct["parameters"] and rep["layers"] == direct["layers"]
    assert torch.tensor(rep["rank_weight_bytes"]).tolist() == direct["rank_weight_bytes"]


@pytest.mark.slow
def test_convert_fuse_and_plan_take_an_engine_dir(tmp_path):
    """Where a checkpoint is expected, an engines/NAME directory stands for the HF checkpoint it came from."""
    from export.trtllm.convert import convert
    from tests.conftest import write_tokenizer

    spec = ModelSpec(hidden=64, heads=4, head_dim=16, vocab=50,
                     layers=(full(2, 256), *[ffn_only(256)] * 3, full(2, 256)), dtype="float32")
    src = write_random_checkpoint(tmp_path / "src", spec, seed=5)
    write_tokenizer(src)
    eng = convert(src, tmp_path / "eng", tp=2, progress=False).out

    def run(*args):
        return subprocess.run([sys.executable, "-m", "export", *map(str, args)], capture_output=True, text=True)

    r = run("plan", eng, "--out", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    r = run("fuse", eng, "--plan", tmp_path / "plan.json", "--out", tmp_path / "fused")
    assert r.returncode == 0 and "reading the HF checkpoint it came from" in r.stderr, r.stderr
    r = run("convert", eng, "--tp", "1", "--out", tmp_path / "eng1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eng1/manifest.json").read_text())["source_path"] == str(src.resolve())
    r = run("convert", "--dry-run", eng, "--tp", "2", "--summary")
    assert r.returncode == 0, r.stderr

"""convert --dry-run: from config.json alone, on the real Ultra config and a tiny one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.cli import main
from export.errors import ExportError
from export.layout import rank_bytes
from export.mapping import Mapping
from export.spec import ModelSpec
from export.trtllm.dryrun import dry_run
from tests.conftest import hetero_spec
from tests.oracles import expected_shapes
from tests.test_spec import ULTRA

REPO = Path(__file__).resolve().parents[1]


def test_ultra_tp8_every_split_divides_and_matches_inspect():
    spec = ModelSpec.load(ULTRA)
    rep = dry_run(spec, Mapping(8))
    assert rep["problems"] == [] and rep["dtype"] == "bfloat16"
    for r in rep["ranks"]:
        shapes = {t["name"]: tuple(t["shape"]) for t in r["tensors"]}
        assert shapes == expected_shapes(spec, Mapping(8), r["rank"])
        assert r["bytes"] == rank_bytes(spec, Mapping(8), r["rank"]) == 67_031_859_200
    r0 = {t["name"]: t["shape"] for t in rep["ranks"][0]["tensors"]}
    assert r0["transformer.layers.0.attention.qkv.weight"] == [2304, 16384]  # 16 q + 1 k + 1 v heads
    assert r0["transformer.layers.0.attention.dense.weight"] == [16384, 2048]
    assert r0["lm_head.weight"] == [16032, 16384]
    assert r0["transformer.vocab_embedding.weight"] == [128256, 16384]
    assert r0["transformer.layers.134.ffn.fc.weight"] == [425984 // 8, 16384]  # the widest fused FFN
    assert not any(n.startswith("transformer.layers.9.") for n in r0)  # an empty block: no tensors
    assert len(rep["config"]["layer_configs"]) == 162


@pytest.mark.slow
def test_cli_dry_run_ultra(tmp_path):
    out = subprocess.run([sys.executable, "-m", "export", "convert", "--dry-run", str(ULTRA), "--tp", "8"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "rank0.safetensors (tp_rank 0, pp_rank 0): 519 tensors, 67,031,859,200 bytes (62.4 GiB)"
    assert any(line.split() == ["transformer.layers.0.attention.qkv.weight", "[2304,", "16384]", "75,497,472"]
               for line in lines)
    assert lines[-1].startswith("total 536,254,873,600 bytes") and "match `inspect`" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # wrote nothing


def test_dry_run_pp_and_refusal(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(hetero_spec().to_hf_config()))
    assert main(["convert", "--dry-run", str(cfg), "--tp", "2", "--pp", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["pp_rank"] for r in rep["ranks"]] == [0, 0, 1, 1]
    assert [r["bytes"] for r in rep["ranks"]] == [rank_bytes(hetero_spec(), Mapping(2, 2), r) for r in range(4)]
    with pytest.raises(ExportError, match="tp=3 does not divide"):
        dry_run(hetero_spec(), Mapping(3))
    assert main(["convert", "--dry-run", str(cfg), "--pp", "3"]) == 2  # stages 0-2, 3-5, 6-7
    err = capsys.readouterr().err
    assert "stage 2 (layers 6-7) has no full-attention layer" in err and "nearest pp that works: 2" in err
    assert main(["convert", "--dry-run", str(cfg), "--pp", "9"]) == 2
    assert "pp=9 is more stages than the 8 layers" in capsys.readouterr().err

"""verify: the runtime on the exported rank files (real worker processes) vs the source at tp = 1."""

from __future__ import annotations

import pytest
import torch

from export.checks.verify import verify
from export.cli import main
from export.manifest import Manifest
from export.trtllm.convert import convert
from tests.conftest import hetero_spec
from tests.trtllm_helpers import make_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.set_num_threads(1)
    # hetero: a fused-wide FFN (2048), a layer with 1 kv head (< tp), an empty layer, linear layers
    return make_source(tmp_path_factory.mktemp("v") / "src", hetero_spec(), seed=5)


SLOW = pytest.mark.slow  # tp * pp > 1 verifies in worker processes


@pytest.mark.parametrize("tp,pp", [(1, 1), pytest.param(2, 1, marks=SLOW), pytest.param(4, 1, marks=SLOW),
                                   pytest.param(2, 2, marks=SLOW)])
def test_verify_passes_fp32(source, tmp_path, tp, pp):
    eng = convert(source, tmp_path / "e", tp=tp, pp=pp, progress=False).out
    res = verify(eng, source)
    assert res.passed and res.lossless and res.max_abs_diff <= 1e-4, res.summary()
    cpu = Manifest.load(eng).engines["cpu"]
    assert cpu["verified"] is True and cpu["max_abs_diff"] == res.max_abs_diff


def test_verify_bf16_reported_and_cli(source, tmp_path, capsys):
    eng = convert(source, tmp_path / "e", tp=1, dtype="bf16", progress=False).out
    assert main(["verify", str(eng)]) == 0  # --against defaults to the manifest's source_path
    out = capsys.readouterr().out
    assert "PASS" in out and "float32 source -> bfloat16" in out
    cpu = Manifest.load(eng).engines["cpu"]
    assert 0 < cpu["max_abs_diff"] <= cpu["tolerance"]  # bf16 rounding shows, within the lossy bound


def test_verify_catches_a_corrupted_rank_file(source, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    eng = convert(source, tmp_path / "e", tp=1, progress=False).out  # in-process: the packing is what is tested
    f = eng / "checkpoint" / "rank0.safetensors"
    tensors = load_file(f)
    qkv = tensors["transformer.layers.1.attention.qkv.weight"]  # 8 q heads, then 4 k, then 4 v heads of 8 rows
    qkv[64:72] = qkv[96:104].clone()  # the first k head replaced by the first v head: shapes still fine
    save_file(tensors, f)
    assert main(["verify", str(eng), "--against", str(source)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert Manifest.load(eng).engines["cpu"]["verified"] is False


@pytest.mark.slow
def test_widening_bf16_to_fp32_is_held_to_the_strict_tolerance(tmp_path):
    """bf16 -> fp32 loses nothing, so it gets 1e-4, not the lossy 5%-of-max-logit bound (0.75 on
    the demo model), which would let a wrong packing through."""
    src = make_source(tmp_path / "src", hetero_spec(dtype="bfloat16"), seed=6)
    eng = convert(src, tmp_path / "e", tp=2, dtype="fp32", progress=False).out
    res = verify(eng, src)
    assert res.lossless and res.tolerance == 1e-4 and res.passed, res.summary()
    assert "bfloat16 source -> float32, exact" in res.summary()
    lossy = verify(convert(src, tmp_path / "h", tp=1, dtype="fp16", progress=False).out, src)
    assert not lossy.lossless and lossy.tolerance > 1e-4  # bf16 -> fp16 is not exact (range)

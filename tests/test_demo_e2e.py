"""`python -m export demo`, the README's main command, end to end as a user runs it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_step(tmp_path):
    work, engines = tmp_path / "work", tmp_path / "engines" / "demo"
    proc = subprocess.run([sys.executable, "-m", "export", "demo", "--work", str(work), "--engine-dir", str(engines),
                           "--max-tokens", "24"], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for name in ("analyze", "fuse", "evaluate", "convert", "verify", "build", "package", "serve", "query", "stop"):
        assert re.search(rf"^== {re.escape(name)}: ", out, re.M), f"step {name} missing"
    assert re.search(r"result\s+PASSED", out)  # verify: rank files at tp=2 reproduce the source logits
    assert re.search(r"TensorRT-LLM engine\s+NOT built here \(unverified", out)  # never claimed on a CPU host
    assert re.search(r"same text as stream\s+True", out)
    assert re.search(r"processes left\s+0", out)
    assert re.search(r"result\s+[1-9][0-9]* tokens, time to first token", out)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["tp"] == 2 and manifest["engines"]["cpu"]["verified"] is True
    assert "trtllm" not in manifest["engines"] and "onnx" in manifest["engines"]
    assert re.search(r"ONNX graph\s+.*checked", out)
    assert re.search(r"== package: Triton model repository, ONNX Runtime's fused graph \(onnx-fast\) at tp=1", out)
    engine_config = (work / "triton_repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'key: "runtime" value: { string_value: "onnx-fast" }' in engine_config  # the faster exact path
    assert (work / "analysis" / "heatmap.png").stat().st_size > 10_000


def test_demo_fp8_runs_every_step_in_fp8(tmp_path):
    """`demo --fp8`: quantize -> fuse -> convert (TRT-LLM FP8 rank files, tp 2) -> verify -> package
    (the PyTorch runtime, which emulates FP8) -> serve -> query, with the quality figures printed."""
    work, engines = tmp_path / "work", tmp_path / "engines" / "demo-fp8"
    proc = subprocess.run([sys.executable, "-m", "export", "demo", "--fp8", "--work", str(work), "--engine-dir",
                           str(engines), "--max-tokens", "16"], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for name in ("analyze", "quantize", "fuse", "evaluate", "convert", "verify", "package", "serve", "query", "stop"):
        assert re.search(rf"^== {re.escape(name)}: ", out, re.M), f"step {name} missing"
    kl = float(re.search(r"KL vs bf16\s+([0-9.e+-]+)", out).group(1))
    assert 0 < kl < 1e-2  # measured 2.8e-3 (docs/fp8.md)
    assert re.search(r"quantization\s+FP8 per-tensor, KV cache FP8, excluded: lm_head", out)
    assert re.search(r"result\s+PASSED", out)
    assert re.search(r"== package: Triton model repository, PyTorch runtime at tp=2", out)
    assert re.search(r"same text as stream\s+True", out) and re.search(r"processes left\s+0", out)
    config = json.loads((engines / "checkpoint" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8" and config["quantization"]["kv_cache_quant_algo"] == "FP8"
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                        "exclude_modules": ["lm_head"]}

"""An FP8 engine directory through package / serve / query: the manifest records FP8, the cpu
flavour runs the torch runtime (the one that emulates FP8), the ONNX graph and its runtime refuse
FP8 in one line, and a real tritonserver's greedy text equals `python -m export generate` on the
same HF FP8 source."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from triton_support import FP8, make_fp8_engine_dir

from export.engine_dir import EngineDir
from export.errors import ExportError
from export.manifest import Manifest
from export.quantization import Quantization
from export.triton.package import package_repo
from export.triton.render import parse_model_config

ROOT = Path(__file__).resolve().parent.parent
REFUSAL = (r"is quantized \(FP8 per-tensor, KV cache FP8, excluded: lm_head\); {what} has no FP8 \(it is "
           r"emulated in the torch runtime only\): use --runtime torch$")


@pytest.fixture(scope="module")
def fp8_engine(tmp_path_factory) -> tuple[Path, Path]:
    return make_fp8_engine_dir(tmp_path_factory.mktemp("fp8"), tp=2)


def engine_params(repo: Path) -> dict[str, str]:
    cfg = parse_model_config((repo / "tensorrt_llm/config.pbtxt").read_text(), "tensorrt_llm")
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_the_manifest_records_fp8(fp8_engine):
    engine_dir, _ = fp8_engine
    assert EngineDir(engine_dir).quantization == Quantization(*FP8)
    assert Manifest.load(engine_dir).quantization == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                                      "exclude_modules": ["lm_head"]}


def test_a_manifest_from_before_fp8_records_none(tmp_path):
    m = Manifest(source_path="x", source_sha256="0", tp=1, pp=1, dtype="float32")
    m.save(tmp_path)
    assert "quantization" in json.loads((tmp_path / "manifest.json").read_text())
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["quantization"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert EngineDir(tmp_path).quantization.is_none


def test_package_picks_the_torch_runtime_for_fp8(fp8_engine, tmp_path):
    engine_dir, _ = fp8_engine
    p = engine_params(package_repo(engine_dir, tmp_path / "repo", backend="cpu"))
    assert p["runtime"] == "torch" and p["tp"] == "2"
    chosen = package_repo(engine_dir, tmp_path / "r2", backend="cpu", runtime="torch")
    assert engine_params(chosen)["runtime"] == "torch"


@pytest.mark.parametrize("how", [{"backend": "cpu", "runtime": "onnx"}, {"backend": "onnx"}])
def test_package_refuses_the_onnx_runtime_for_fp8(fp8_engine, tmp_path, how):
    engine_dir, _ = fp8_engine
    with pytest.raises(ExportError, match="^package: .*/tiny-fp8 " + REFUSAL.format(what="runtime 'onnx'")):
        package_repo(engine_dir, tmp_path / "repo", **how)
    assert not (tmp_path / "repo").exists()


def test_the_onnx_export_and_runtime_refuse_fp8(fp8_engine, tmp_path):
    from export.onnx.export import export_onnx
    from export.runtime.engine import Engine

    engine_dir, src = fp8_engine
    with pytest.raises(ExportError, match=REFUSAL.format(what="the ONNX export")):
        export_onnx(src, tmp_path / "onnx", progress=False)
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(ExportError, match=REFUSAL.format(what="runtime 'onnx'")):
        Engine.start(engine_dir, runtime="onnx")


@pytest.mark.parametrize("runtime", ["torch-fast", "onnx-fast"])
def test_the_fast_runtimes_refuse_fp8_and_generate_prints_only_the_refusal(fp8_engine, capsys, runtime):
    """The fast runtimes read the weights as they are (no emulation): an FP8 source is refused, and
    `generate` prints nothing else (the prompt is echoed only once the engine runs)."""
    from export.cli import main

    engine_dir, src = fp8_engine
    assert main(["generate", str(src), "hello", "--runtime", runtime, "--tokenizer", str(engine_dir / "tokenizer"),
                 "--max-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert re.search(REFUSAL.format(what=f"runtime '{runtime}'"), err.strip())


def test_a_stale_manifest_quantization_is_refused(fp8_engine, tmp_path):
    import shutil

    engine_dir, _ = fp8_engine
    stale = tmp_path / "stale"
    shutil.copytree(engine_dir, stale)
    m = Manifest.load(stale)
    m.quantization = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    m.save(stale)
    with pytest.raises(ExportError, match=r"manifest.json: quantization says FP8 per-tensor, excluded: lm_head but "
                                          r"the checkpoint .* is FP8 per-tensor, KV cache FP8"):
        package_repo(stale, tmp_path / "repo", backend="cpu")


def test_the_trtllm_flavour_needs_nothing_for_fp8(fp8_engine, tmp_path):
    """tensorrtllm_backend's tensorrt_llm model has no weight or KV-cache dtype parameter (docs/model_config.md):
    both are compiled into the engine from the checkpoint's quantization, so an FP8 engine renders as a bf16 one."""
    import shutil

    engine_dir, _ = fp8_engine
    built = tmp_path / "built"
    shutil.copytree(engine_dir, built)
    (built / "trtllm").mkdir()
    m = Manifest.load(built)
    m.engines["trtllm"] = {"path": "trtllm"}
    m.save(built)
    p = engine_params(package_repo(built, tmp_path / "repo", backend="trtllm"))
    assert p["gpt_model_path"] == str(built.resolve() / "trtllm")
    assert not [k for k in p if "dtype" in k or "quant" in k or "fp8" in k]


# ---- the real server ---------------------------------------------------------------------------
PROMPTS = ["héllo wörld 中文", "the quick brown fox"]
MAX_TOKENS = 12
EOS = 2  # tiny_spec's eos_token_id, the tokenizer's </s>


def generate(src: Path, prompt: str, tp: int) -> dict:
    res = subprocess.run([sys.executable, "-m", "export", "generate", str(src), prompt, "--max-tokens",
                          str(MAX_TOKENS), "--tp", str(tp), "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow
def test_served_fp8_greedy_text_equals_generate_on_the_fp8_source(fp8_engine, tmp_path):
    from export.triton.client import Request, query
    from export.triton.server import start_server

    engine_dir, src = fp8_engine
    want = {p: generate(src, p, tp=2) for p in PROMPTS}
    res = subprocess.run([sys.executable, "-m", "export", "package", str(engine_dir), "--out", str(tmp_path / "repo")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "quantization: FP8 per-tensor, KV cache FP8, excluded: lm_head (emulated by the torch runtime)" in res.stdout
    assert engine_params(tmp_path / "repo")["runtime"] == "torch"
    with start_server(tmp_path / "repo", timeout=240) as server:
        for prompt in PROMPTS:
            for model, protocol, stream in (("ensemble", "grpc", True), ("tensorrt_llm_bls", "http", False)):
                url = server.grpc_url if protocol == "grpc" else server.http_url
                got = query(Request(prompt, max_tokens=MAX_TOKENS, stream=stream, temperature=0.0), url=url,
                            protocol=protocol, model=model, timeout=120)
                assert got.text == want[prompt]["text"], (model, protocol, prompt)
                new = want[prompt]["new_tokens"]
                assert got.tokens == len(new) - (new[-1:] == [EOS])  # the server does not count the end token
        cli = subprocess.run([sys.executable, "-m", "export", "query", PROMPTS[1], "--url", server.grpc_url,
                              "--max-tokens", str(MAX_TOKENS)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout == want[PROMPTS[1]]["text"] + "\n"

"""Rendering the Triton model repository: typed values in, Triton-parseable configs out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from triton_support import make_engine_dir

from export.errors import ExportError
from export.manifest import Manifest
from export.triton.binary import ServerBinary
from export.triton.package import MODELS, RepoSettings, package_repo, render_model, render_repo
from export.triton.render import RenderError, fill, parse_model_config
from export.triton.server import DEPLOY_FILE, server_command


def settings(backend: str, tmp: Path, **kw) -> RepoSettings:
    base = dict(backend=backend, tokenizer_dir=tmp, max_batch_size=4, max_input_len=64, max_seq_len=128, tp=2,
                checkpoint_dir=tmp / "checkpoint", engine_dir=tmp / "trtllm")
    return RepoSettings(**{**base, **kw})


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.mark.parametrize("backend", ["cpu", "trtllm"])
def test_every_config_parses_with_tritons_schema(tmp_path, backend):
    s = settings(backend, tmp_path)
    cfgs = {name: parse_model_config(render_model(name, s), name, expect_name=name) for name in MODELS}
    assert cfgs["ensemble"].platform == "ensemble"
    assert [st.model_name for st in cfgs["ensemble"].ensemble_scheduling.step] == \
        ["preprocessing", "tensorrt_llm", "postprocessing"]
    assert {i.name for i in cfgs["ensemble"].input} >= {"text_input", "max_tokens", "temperature", "top_k", "top_p",
                                                        "end_id", "pad_id", "stop_words", "bad_words", "stream"}
    assert next(o.name for o in cfgs["ensemble"].output) == "text_output"
    assert {i.name for i in cfgs["tensorrt_llm_bls"].input} == {i.name for i in cfgs["ensemble"].input}
    engine = cfgs["tensorrt_llm"]
    assert engine.model_transaction_policy.decoupled and cfgs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    assert all(c.max_batch_size == 4 for c in cfgs.values())
    assert params(cfgs["preprocessing"])["tokenizer_dir"] == str(tmp_path)
    if backend == "trtllm":
        p = params(engine)
        assert engine.backend == "tensorrtllm"
        assert p["gpt_model_path"] == str(tmp_path / "trtllm")
        assert p["gpt_model_type"] == "inflight_fused_batching" and p["kv_cache_free_gpu_mem_fraction"] == "0.9"
        assert p["gpu_device_ids"] == "0,1"  # one GPU per rank by default
    else:
        assert engine.backend == "python" and params(engine)["tp"] == "2"
        names = {key for st in cfgs["ensemble"].ensemble_scheduling.step for key in st.input_map}
        assert "GENERATED_IDS" in names  # incremental detokenization is wired


def test_missing_value_names_file_and_key(tmp_path):
    with pytest.raises(RenderError, match=r"tensorrt_llm/config.pbtxt.*'engine_dir'"):
        render_model("tensorrt_llm", settings("trtllm", tmp_path, engine_dir=None))


def test_all_missing_keys_reported_and_leftovers_caught():
    with pytest.raises(RenderError, match=r"x.pbtxt: required value\(s\) 'a', 'b' missing"):
        fill("${a} ${b} ${a}", {}, "x.pbtxt")
    with pytest.raises(RenderError, match=r"placeholder '\$\{inner\}' is left"):
        fill("v: ${a}", {"a": "${inner}"}, "y.pbtxt")


def test_protobuf_errors_name_the_file():
    with pytest.raises(RenderError, match=r"z/config\.pbtxt: not a valid Triton model config"):
        parse_model_config('name: "z" max_batch_size: four', "z/config.pbtxt")
    with pytest.raises(RenderError, match="does not match its directory"):
        parse_model_config('name: "other"', "z/config.pbtxt", expect_name="z")


def test_bad_settings_are_refused_before_writing(tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(ExportError, match="kv_cache_free_gpu_mem_fraction"):
        render_repo(settings("trtllm", tmp_path, kv_cache_free_gpu_mem_fraction=1.5), out)
    with pytest.raises(ExportError, match="batching_strategy"):
        render_repo(settings("trtllm", tmp_path, batching_strategy="static"), out)
    with pytest.raises(ExportError, match="runtime_dtype must be one of"):
        render_repo(settings("cpu", tmp_path, runtime_dtype="int8"), out)
    assert not out.exists()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return make_engine_dir(tmp_path_factory.mktemp("eng"), tp=2)


def test_package_cpu_from_manifest(engine_dir, tmp_path):
    repo = package_repo(engine_dir, tmp_path / "repo", backend="cpu")
    for name in MODELS:
        parse_model_config((repo / name / "config.pbtxt").read_text(), name, expect_name=name)
        assert (repo / name / "1").is_dir()
    engine = parse_model_config((repo / "tensorrt_llm/config.pbtxt").read_text(), "e")
    # relative to the repository (issue 20: relocatable), the bundled files hard links of the engine's
    assert params(engine)["checkpoint_dir"] == "tensorrt_llm/engine/checkpoint" and params(engine)["tp"] == "2"
    for f in (engine_dir / "checkpoint").iterdir():
        assert (repo / "tensorrt_llm/engine/checkpoint" / f.name).stat().st_ino == f.stat().st_ino
    assert (repo / "tensorrt_llm/1/model.py").is_file() and not list(repo.rglob("config.cpu.pbtxt"))
    assert json.loads((repo / DEPLOY_FILE).read_text())["world_size"] == 1


def test_cpu_engine_computes_in_fp32_unless_asked(engine_dir, tmp_path):
    """A bf16 checkpoint still runs fp32 GEMMs on the CPU (bf16 ran at half speed on AVX2)."""
    from export.trtllm.convert import convert

    bf16 = convert(engine_dir.parent.parent / "hf", tmp_path / "bf16", tp=1, dtype="bf16", progress=False).out
    assert Manifest.load(bf16).dtype == "bfloat16"
    dtype = lambda repo: params(parse_model_config((repo / "tensorrt_llm/config.pbtxt").read_text(), "e"))["dtype"]  # noqa: E731
    assert dtype(package_repo(bf16, tmp_path / "r1", backend="cpu")) == "float32"
    assert dtype(package_repo(bf16, tmp_path / "r2", backend="cpu", runtime_dtype="bfloat16")) == "bfloat16"


def test_package_trtllm_needs_a_built_engine_then_uses_manifest_settings(engine_dir, tmp_path):
    with pytest.raises(ExportError, match=r"no .trtllm. engine.*run `build` on a GPU host"):
        package_repo(engine_dir, tmp_path / "repo", backend="trtllm")
    m = Manifest.load(engine_dir)
    m.engines["trtllm"] = {"path": "trtllm", "kv_cache_free_gpu_mem_fraction": 0.5, "batching_strategy": "V1"}
    m.save(engine_dir)
    try:
        repo = package_repo(engine_dir, tmp_path / "repo", backend="trtllm", max_batch_size=2)
    finally:
        del m.engines["trtllm"]
        m.save(engine_dir)
    engine = parse_model_config((repo / "tensorrt_llm/config.pbtxt").read_text(), "e")
    p = params(engine)
    assert engine.backend == "tensorrtllm" and engine.max_batch_size == 2
    assert p["gpt_model_path"] == str(engine_dir / "trtllm") and p["gpt_model_type"] == "V1"
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.5" and p["gpu_device_ids"] == "0,1"
    assert not (repo / "tensorrt_llm/1/model.py").exists()  # the C++ backend needs no model.py
    assert json.loads((repo / DEPLOY_FILE).read_text())["world_size"] == 2


def test_multi_rank_launch_is_mpmd_mpirun_or_refused(tmp_path, monkeypatch):
    bundled = ServerBinary(Path("/x/tritonserver"), bundled=True, backend_dir=tmp_path)
    with pytest.raises(ExportError, match="world size 2 needs NVIDIA's tritonserver"):
        server_command(bundled, tmp_path, host="127.0.0.1", http_port=1, grpc_port=2, metrics_port=3, world_size=2)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mpirun").write_text("#!/bin/sh\n")
    (fake / "mpirun").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    cmd = server_command(ServerBinary(Path("/opt/tritonserver/bin/tritonserver"), bundled=False), tmp_path,
                         host="127.0.0.1", http_port=1, grpc_port=2, metrics_port=3, world_size=2)
    assert cmd[0].endswith("mpirun") and cmd.count(":") == 1 and cmd.count("-n") == 2
    rank1 = cmd[cmd.index(":") + 1:]
    assert "--load-model=tensorrt_llm" in rank1 and "--model-control-mode=explicit" in rank1

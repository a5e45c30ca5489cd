"""The runtime registry: one entry per runtime, asked by Engine.start, package and the CLI alike;
the runtime layer never imports export.onnx at import time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from triton_support import make_engine_dir

from export.errors import ExportError
from export.runtime import registry

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_runtime_and_package_does_not_import_onnx():
    code = ("import sys, export.runtime.engine, export.runtime.bench, export.triton.package, export.cli; "
            "print(sorted(m for m in sys.modules if m == 'onnx' or m.startswith(('export.onnx', 'onnx.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_entry_loads_and_declares_what_it_runs():
    from export.onnx.backend import GRAPH_DTYPE

    assert registry.names() == ("torch", "onnx", "torch-fast", "onnx-fast")
    for entry in registry.RUNTIMES.values():
        assert callable(entry.load())
        assert set(entry.dtypes) <= set(registry.ALL_DTYPES)
    onnx = registry.get("onnx")
    assert onnx.dtypes == (GRAPH_DTYPE,) and not onnx.runs(2, 1) and onnx.runs(1, 1)
    assert registry.get("onnx-fast").dtypes == (GRAPH_DTYPE,) and registry.get("onnx-fast").engine == onnx.engine
    assert registry.get("torch").runs(2, 2) and not registry.get("torch-fast").runs(2, 1)
    assert not registry.get("onnx-fast").runs(1, 2)
    with pytest.raises(ExportError, match=r"runtime must be one of \('torch', 'onnx', 'torch-fast', 'onnx-fast'\), "
                                          r"got 'tensorrt'"):
        registry.get("tensorrt")
    with pytest.raises(ValueError, match="twice"):
        registry.register(registry.RuntimeEntry("torch", "x:y", "again"))


def test_a_new_runtime_is_one_entry(tmp_path):
    """Engine.start runs whatever the entry starts; nothing else names the runtime."""
    from export.runtime.engine import Engine
    from export.runtime.sampling import SamplingParams

    engine_dir = make_engine_dir(tmp_path, tp=1)
    registry.register(registry.RuntimeEntry("torch-again", "export.runtime.torch_runtime:start_torch", "a copy"))
    try:
        with Engine.start(engine_dir / "checkpoint", runtime="torch-again") as eng, \
                Engine.start(engine_dir / "checkpoint") as ref:
            params = SamplingParams(max_tokens=4)
            assert eng.generate([[1, 2, 3]], params) == ref.generate([[1, 2, 3]], params)
    finally:
        del registry.RUNTIMES["torch-again"]


def _engine_params(repo: Path) -> dict[str, str]:
    text = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    keys = ("tp", "pp", "dtype", "runtime")
    return {k: text.split(f'key: "{k}" value: {{ string_value: "')[1].split('"')[0] for k in keys}


def test_package_runtime_onnx_equals_the_older_backend_onnx(tmp_path):
    from export.onnx.export import build_onnx
    from export.triton.package import package_repo

    engine_dir = make_engine_dir(tmp_path, tp=2)
    build_onnx(engine_dir, progress=False)
    new = package_repo(engine_dir, tmp_path / "new", backend="cpu", runtime="onnx")
    old = package_repo(engine_dir, tmp_path / "old", backend="onnx")
    for repo in (new, old):  # the graph runs the whole model at tp=1, whatever the checkpoint's split
        assert _engine_params(repo) == {"tp": "1", "pp": "1", "dtype": "float32", "runtime": "onnx"}
        assert (repo / "tensorrt_llm" / "engine" / "onnx").is_dir()
    assert (new / "tensorrt_llm" / "config.pbtxt").read_text() == (old / "tensorrt_llm" / "config.pbtxt").read_text()
    torch_repo = package_repo(engine_dir, tmp_path / "torch", backend="cpu")
    assert _engine_params(torch_repo) == {"tp": "2", "pp": "1", "dtype": "float32", "runtime": "torch"}
    assert not (torch_repo / "tensorrt_llm" / "engine" / "onnx").exists()
    assert json.loads((new / "triton_deploy.json").read_text())["settings"]["runtime"] == "onnx"


def test_package_refuses_runtimes_that_do_not_fit(tmp_path):
    from export.triton.package import package_repo

    engine_dir = make_engine_dir(tmp_path, tp=1)
    with pytest.raises(ExportError, match=r"no ONNX engine.*build .* --onnx"):
        package_repo(engine_dir, tmp_path / "a", backend="cpu", runtime="onnx")
    with pytest.raises(ExportError, match="package: runtime must be one of"):
        package_repo(engine_dir, tmp_path / "b", backend="cpu", runtime="tensorrt")
    with pytest.raises(ExportError, match=r"--backend onnx runs runtime 'onnx'; got runtime 'torch'"):
        package_repo(engine_dir, tmp_path / "c", backend="onnx", runtime="torch")
    with pytest.raises(ExportError, match="runtime do not apply"):
        package_repo(engine_dir, tmp_path / "d", backend="trtllm", runtime="onnx")


def test_package_refuses_a_dtype_the_runtime_does_not_run(tmp_path):
    from export.onnx.export import build_onnx
    from export.triton.package import package_repo

    engine_dir = make_engine_dir(tmp_path, tp=1)
    build_onnx(engine_dir, progress=False)
    with pytest.raises(ExportError, match=r"runtime 'onnx' runs float32 only, got runtime_dtype 'bfloat16'"):
        package_repo(engine_dir, tmp_path / "r", backend="cpu", runtime="onnx", runtime_dtype="bfloat16")


def test_package_serves_the_fastest_exact_runtime_it_can_by_default(tmp_path):
    """onnx-fast where the ONNX engine is built, the split is tp=pp=1 and the dtype fp32; else torch."""
    from export.onnx.export import build_onnx
    from export.triton.package import package_repo

    engine_dir = make_engine_dir(tmp_path, tp=1)
    plain = package_repo(engine_dir, tmp_path / "plain", backend="cpu")
    assert _engine_params(plain)["runtime"] == "torch"
    build_onnx(engine_dir, progress=False)
    fast = package_repo(engine_dir, tmp_path / "fast", backend="cpu")
    assert _engine_params(fast) == {"tp": "1", "pp": "1", "dtype": "float32", "runtime": "onnx-fast"}
    assert (fast / "tensorrt_llm" / "engine" / "onnx").is_dir()
    bf16 = package_repo(engine_dir, tmp_path / "bf16", backend="cpu", runtime_dtype="bfloat16")
    assert _engine_params(bf16)["runtime"] == "torch"
    assert registry.preferred(2, 1, "float32", lambda own: True) == "torch"

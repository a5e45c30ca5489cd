"""The ONNX runtimes through a real tritonserver: `package --backend onnx` serves engines/NAME/onnx
with ONNX Runtime, `package` with no runtime named serves the same engine on onnx-fast (the fastest
exact runtime, its default where the ONNX engine is built), and the greedy text of both equals the
reference runtime's."""

from __future__ import annotations

import pytest
from triton_support import make_engine_dir

from export.triton.client import Request, query

PROMPTS = ["héllo wörld 中文", "the quick brown fox"]
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["onnx", "default"])
def served(request, tmp_path_factory):
    from export.onnx.export import build_onnx
    from export.runtime.engine import Engine
    from export.runtime.sampling import SamplingParams
    from export.triton.package import package_repo
    from export.triton.pipeline import load_tokenizer
    from export.triton.server import start_server

    root = tmp_path_factory.mktemp("onnx-triton")
    engine_dir = make_engine_dir(root, tp=1)
    build_onnx(engine_dir, progress=False)
    tok = load_tokenizer(str(engine_dir / "tokenizer"))
    reference = {}
    with Engine.start(engine_dir / "checkpoint") as engine:  # the PyTorch runtime, fp32
        for p in PROMPTS:
            ids = engine.generate([tok.encode(p)], SamplingParams(MAX_TOKENS, stop_token_ids=(tok.eos_token_id,)))[0]
            ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            reference[p] = (tok.decode(ids), len(ids))
    if request.param == "onnx":
        repo = package_repo(engine_dir, root / "repo", backend="onnx")
    else:
        repo = package_repo(engine_dir, root / "repo")
    runtime = {"onnx": "onnx", "default": "onnx-fast"}[request.param]
    config = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert f'key: "runtime" value: {{ string_value: "{runtime}" }}' in config
    # The torch runtime could not load without its rank file; the ONNX engine never reads it.
    (engine_dir / "checkpoint" / "rank0.safetensors").rename(root / "rank0.safetensors.aside")
    with start_server(repo, timeout=240) as server:
        yield server, reference
    assert not server.alive()
    assert server.process.returncode == 0, "tritonserver did not stop cleanly (a model outlived its exit timeout)"


@pytest.mark.slow
@pytest.mark.parametrize(("model", "protocol", "stream"),
                         [("ensemble", "grpc", True), ("tensorrt_llm_bls", "http", False)])
def test_onnx_flavour_text_equals_reference_greedy_output(served, model, protocol, stream):
    server, reference = served
    url = server.grpc_url if protocol == "grpc" else server.http_url
    for prompt in PROMPTS:
        res = query(Request(prompt, max_tokens=MAX_TOKENS, stream=stream, temperature=0.0),
                    url=url, protocol=protocol, model=model, timeout=60)
        assert (res.text, res.tokens) == reference[prompt]


def test_package_onnx_without_an_onnx_engine_is_refused(tmp_path):
    from export.errors import ExportError
    from export.triton.package import package_repo

    engine_dir = make_engine_dir(tmp_path, tp=1)
    with pytest.raises(ExportError, match=r"no ONNX engine.*build .* --onnx"):
        package_repo(engine_dir, tmp_path / "repo", backend="onnx")

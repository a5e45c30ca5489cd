"""The LLM-API routes: `package --backend llmapi` (TensorRT-LLM's Triton llmapi layout, served here by the cpu
implementation with the real tritonserver) and `package --backend trtllm-serve` (files only).

Upstream files the layout follows (NVIDIA/TensorRT-LLM): triton_backend/all_models/llmapi/tensorrt_llm/
config.pbtxt @0a71057, 1/model.yaml @0ebb153, 1/model.py @044a90d; tensorrt_llm/commands/serve.py @00209af.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from triton_support import make_engine_dir, stop_serve

from export.errors import ExportError
from export.triton import llmapi
from export.triton.client import QueryError, Request, query
from export.triton.package import package_repo

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["héllo wörld 中文", "the quick brown fox"]
MAX_TOKENS = 12

# upstream config.pbtxt @0a71057: name -> (data_type, dims)
UPSTREAM_INPUTS = {
    "text_input": ("TYPE_STRING", [-1]), "image_url": ("TYPE_STRING", [-1]), "streaming": ("TYPE_BOOL", [1]),
    "sampling_param_best_of": ("TYPE_INT32", [1]), "sampling_param_temperature": ("TYPE_FP32", [1]),
    "sampling_param_top_k": ("TYPE_INT32", [1]), "sampling_param_top_p": ("TYPE_FP32", [1]),
    "sampling_param_frequency_penalty": ("TYPE_FP32", [1]), "sampling_param_presence_penalty": ("TYPE_FP32", [1]),
    "sampling_param_max_tokens": ("TYPE_INT32", [1]), "sampling_param_stop": ("TYPE_STRING", [-1]),
    "sampling_param_seed": ("TYPE_UINT64", [1]), "sampling_param_exclude_input_from_output": ("TYPE_BOOL", [1]),
    "sampling_param_return_perf_metrics": ("TYPE_BOOL", [1]), "return_finish_reason": ("TYPE_BOOL", [1]),
    "return_stop_reason": ("TYPE_BOOL", [1]), "return_cumulative_logprob": ("TYPE_BOOL", [1]),
    "stop": ("TYPE_BOOL", [1]), "lora_id": ("TYPE_UINT64", [1]), "lora_name": ("TYPE_STRING", [1]),
    "lora_path": ("TYPE_STRING", [1]), "lora_ckpt_source": ("TYPE_STRING", [1])}
UPSTREAM_OUTPUTS = {
    "text_output": ("TYPE_STRING", [-1]), "finish_reason": ("TYPE_STRING", [-1]), "stop_reason": ("TYPE_STRING", [-1]),
    "cumulative_logprob": ("TYPE_FP32", [-1]), "kv_cache_reused_block": ("TYPE_INT32", [-1]),
    "kv_cache_missed_block": ("TYPE_INT32", [-1]), "kv_cache_alloc_new_blocks": ("TYPE_INT32", [-1]),
    "kv_cache_alloc_total_blocks": ("TYPE_INT32", [-1]), "kv_cache_hit_rate": ("TYPE_FP32", [-1]),
    "arrival_time_ns": ("TYPE_INT64", [1]), "first_scheduled_time_ns": ("TYPE_INT64", [1]),
    "first_token_time_ns": ("TYPE_INT64", [1]), "last_token_time_ns": ("TYPE_INT64", [1]),
    "acceptance_rate": ("TYPE_FP32", [1]), "total_accepted_draft_tokens": ("TYPE_INT32", [1]),
    "total_draft_tokens": ("TYPE_INT32", [1])}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return make_engine_dir(tmp_path_factory.mktemp("llmapi"), tp=2)


def test_repository_has_upstream_layout_and_contract(engine_dir, tmp_path):
    from google.protobuf import json_format

    from export.triton.render import parse_model_config

    repo = package_repo(engine_dir, tmp_path / "repo", backend="llmapi")
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == ["tensorrt_llm"]  # the llmapi layout has one model
    assert sorted(p.name for p in (repo / "tensorrt_llm" / "1").iterdir()) == ["model.py", "model.yaml"]
    cfg = parse_model_config((repo / "tensorrt_llm" / "config.pbtxt").read_text(), "x", "tensorrt_llm")
    assert cfg.backend == "python" and cfg.max_batch_size == 0 and cfg.model_transaction_policy.decoupled
    as_dict = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    got_in = {i["name"]: (i["data_type"], [int(d) for d in i["dims"]]) for i in as_dict["input"]}
    got_out = {o["name"]: (o["data_type"], [int(d) for d in o["dims"]]) for o in as_dict["output"]}
    assert got_in == UPSTREAM_INPUTS and got_out == UPSTREAM_OUTPUTS
    assert all(i.optional for i in cfg.input if i.name != "text_input")

    conf = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert conf == {"model": str(Path(manifest["source_path"]).resolve()), "backend": "pytorch",
                    "tensor_parallel_size": 2, "pipeline_parallel_size": 1,
                    "max_batch_size": manifest["build"]["max_batch_size"],
                    "max_num_tokens": manifest["build"]["max_num_tokens"],
                    "max_seq_len": manifest["build"]["max_seq_len"], "trust_remote_code": True,
                    "kv_cache_config": {"free_gpu_memory_fraction": 0.9},
                    "triton_config": {"max_batch_size": 0, "decoupled": True}}
    deploy = json.loads((repo / "triton_deploy.json").read_text())
    assert deploy["gpu_launch"].endswith(f"--world_size=2 --model_repo={repo.absolute()} --trtllm_llmapi_launch "
                                         f"--oversubscribe")


def test_overrides_and_hf_source(engine_dir, tmp_path):
    hf = Path(json.loads((engine_dir / "manifest.json").read_text())["source_path"])
    s = llmapi.settings_for(hf, tp=4, max_batch_size=3, kv_cache_free_gpu_mem_fraction=0.5)
    assert (s.model, s.tp, s.pp, s.max_batch_size, s.free_gpu_memory_fraction) == (hf.resolve(), 4, 1, 3, 0.5)
    assert s.max_seq_len == 256  # the tiny model's context caps trtllm-build's default 2048
    with pytest.raises(ExportError, match="engine_queue_limit do not apply"):
        llmapi.settings_for(engine_dir, engine_queue_limit=3)
    with pytest.raises(ExportError, match="free_gpu_memory_fraction must be in"):
        llmapi.settings_for(engine_dir, free_gpu_memory_fraction=1.5)
    with pytest.raises(ExportError, match="pp, tp do not apply"):
        package_repo(engine_dir, tmp_path / "cpu", backend="cpu", tp=1, pp=1)
    with pytest.raises(ExportError, match="neither an engines/NAME"):
        llmapi.settings_for(tmp_path)


@pytest.mark.slow
def test_trtllm_serve_files(engine_dir, tmp_path):
    out = package_repo(engine_dir, tmp_path / "serve", backend="trtllm-serve", tp=2, max_num_tokens=4096)
    opts = yaml.safe_load((out / llmapi.SERVE_YAML).read_text())
    build = json.loads((engine_dir / "manifest.json").read_text())["build"]
    assert opts == {"max_batch_size": build["max_batch_size"], "max_num_tokens": 4096,
                    "max_seq_len": build["max_seq_len"], "kv_cache_config": {"free_gpu_memory_fraction": 0.9}}
    script = (out / llmapi.SERVE_SCRIPT).read_text()
    line = next(x for x in script.splitlines() if x.startswith("exec "))
    assert line.count("--extra_llm_api_options") == 1
    assert " --backend pytorch --tp_size 2 --pp_size 1 " in line and "--trust_remote_code" in line
    assert (out / llmapi.SERVE_SCRIPT).stat().st_mode & 0o111
    res = subprocess.run([sys.executable, "-m", "export", "serve", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "not a Triton model repository" in res.stderr


class Tok:
    eos_token_id, pad_token_id = 2, None

    def encode(self, text, add_special_tokens=True):
        return [1, *(ord(c) % 50 + 3 for c in text)] if add_special_tokens else [ord(c) % 50 + 3 for c in text]


def arr(v, dtype):
    return np.array(v if isinstance(v, list) else [v], dtype=dtype)


def test_request_mapping_and_errors():
    inputs = {"text_input": arr([b"hi"], object), "sampling_param_max_tokens": arr(5, np.int32),
              "sampling_param_stop": arr([b"ab"], object), "streaming": arr(True, bool),
              "return_finish_reason": arr(True, bool)}
    req, cfg, stops = llmapi.llmapi_request(inputs, Tok(), 64)
    assert req.prompt == [1, 7, 8] and req.max_tokens == 5 and req.streaming and req.end_id == 2
    assert req.stop_words == [[Tok().encode("ab", False)[0], Tok().encode("ab", False)[1]]] and stops == ["ab"]
    assert cfg.finish_reason and not cfg.stop_reason and req.temperature == 0.0
    assert llmapi.llmapi_request({"text_input": arr([b"hi"], object)}, Tok(), 64)[0].max_tokens == 32
    assert llmapi.finish_reason([9] * 5, req) == "length" and llmapi.finish_reason([9], req) == "stop"
    assert llmapi.stop_reason([9, *req.stop_words[0]], req, stops) == "ab"
    out = llmapi.llmapi_outputs("abc", cfg, None, None)
    assert out["text_output"].tolist() == [b"abc"] and out["finish_reason"].tolist() == [b"None"]
    bad = [({}, "text_input is missing"), ({"text_input": arr([b"a", b"b"], object)}, "one prompt per request"),
           ({"sampling_param_best_of": arr(2, np.int32)}, "best_of"),
           ({"sampling_param_presence_penalty": arr(0.5, np.float32)}, "presence_penalty"),
           ({"lora_id": arr(1, np.uint64)}, "lora_id"), ({"sampling_param_max_tokens": arr(100, np.int32)}, "exceeds"),
           ({"return_cumulative_logprob": arr(True, bool)}, "cumulative_logprob")]
    for extra, msg in bad:
        base = {} if not extra or "text_input" in extra else {"text_input": arr([b"hi"], object)}
        with pytest.raises(llmapi.RequestError, match=msg):
            llmapi.llmapi_request({**base, **extra}, Tok(), 64)


# ---- served by the real tritonserver ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ensemble_texts(engine_dir, tmp_path_factory):
    """Greedy text per prompt through the ensemble and the BLS of the cpu flavour (tp 2)."""
    from export.triton.server import start_server

    repo = package_repo(engine_dir, tmp_path_factory.mktemp("cpu") / "repo", backend="cpu")
    out = {}
    with start_server(repo, timeout=240) as server:
        for model in ("ensemble", "tensorrt_llm_bls"):
            out[model] = [query(Request(p, max_tokens=MAX_TOKENS), url=server.grpc_url, model=model, timeout=60).text
                          for p in PROMPTS]
    assert out["ensemble"] == out["tensorrt_llm_bls"]
    return out["ensemble"]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 1])
def test_llmapi_served_streams_the_same_greedy_text(engine_dir, ensemble_texts, tmp_path, tp):
    from export.triton.client import StreamSession
    from export.triton.server import start_server

    repo = package_repo(engine_dir, tmp_path / "repo", backend="llmapi", tp=tp)
    with start_server(repo, timeout=240) as server:
        with StreamSession(server.grpc_url) as session:  # no model named: the repository's contract is found
            assert (session.model, session.contract) == ("tensorrt_llm", "llmapi")
        for prompt, want in zip(PROMPTS, ensemble_texts, strict=True):
            res = query(Request(prompt, max_tokens=MAX_TOKENS, stream=True), url=server.grpc_url, timeout=60)
            assert res.text == want and len(res.pieces) > 1 and res.finish_reason in ("stop", "length")
            one = query(Request(prompt, max_tokens=MAX_TOKENS, stream=False), url=server.grpc_url, timeout=60)
            assert one.text == want and len(one.pieces) == 1
            http = query(Request(prompt, max_tokens=MAX_TOKENS, stream=True), url=server.http_url, protocol="http",
                         timeout=60)
            assert http.text == want
        short = query(Request(PROMPTS[1], max_tokens=2), url=server.grpc_url, timeout=60)
        assert short.finish_reason == "length" and ensemble_texts[1].startswith(short.text)
        with pytest.raises(QueryError, match="exceeds the limit"):
            query(Request(PROMPTS[1], max_tokens=100000), url=server.grpc_url, timeout=60)
        with pytest.raises(ExportError, match="no input for bad_words"):
            query(Request(PROMPTS[1], bad_words=("x",)), url=server.grpc_url, timeout=60)
        assert query(Request(PROMPTS[1], max_tokens=MAX_TOKENS), url=server.grpc_url, timeout=60).text == \
            ensemble_texts[1]  # still serving after the bad requests


@pytest.mark.slow
def test_cli_package_serve_query(engine_dir, ensemble_texts, tmp_path):
    from export.triton.server import free_port

    def run(*args):
        return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    res = run("package", str(engine_dir), "--out", str(tmp_path / "repo"), "--backend", "llmapi", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["llm_args"]["tensor_parallel_size"] == 2 and "--trtllm_llmapi_launch" in info["run"]["gpu host"]
    http, grpc, metrics = free_port(), free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-m", "export", "serve", str(tmp_path / "repo"), "--http-port",
                              str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = serve.stdout.readline()
        assert "tritonserver ready" in line, serve.stderr.read()
        res = run("query", PROMPTS[0], "--stream", "--max-tokens", str(MAX_TOKENS), "--url", f"127.0.0.1:{grpc}",
                  "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["text"] == ensemble_texts[0]
    finally:
        stop_serve(serve)
    assert serve.returncode == 0


@pytest.mark.slow
def test_a_dead_tp_worker_ends_the_stream_and_stops_the_server(engine_dir, tmp_path):
    """The cpu engine model's health rule holds for the LLM-API model too (export.triton.health)."""
    import os
    import threading
    import time

    from test_serving_faults import cmdline, wait_not_ready

    from export.triton.procs import tree_pids
    from export.triton.server import start_server

    repo = package_repo(engine_dir, tmp_path / "repo", backend="llmapi", tp=2)
    server = start_server(repo, timeout=240)
    try:
        out, started = {}, threading.Event()

        def run():
            try:
                query(Request(PROMPTS[1], max_tokens=200), url=server.grpc_url, timeout=60,
                      on_text=lambda s: started.set())
                out["err"] = None
            except QueryError as e:
                out["err"] = str(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert started.wait(60), "no stream started"
        (rank1,) = [p for p in tree_pids(server.process.pid)
                    if "export.runtime.worker" in cmdline(p) and "--rank 1 " in cmdline(p)]
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(timeout=15)
        # rank 0's gloo may see its peer gone before the engine sees rank 1's exit: either names a rank
        assert out["err"] and re.search(r"runtime worker rank \d|engine is down", out["err"]), out
        assert time.monotonic() - killed < 15
        wait_not_ready(server, timeout=5)
        server.process.wait(timeout=15)
        assert "engine is down: TP worker rank 1 exited" in server.log_text()
    finally:
        server.stop()


def test_client_picks_the_model_and_contract():
    from export.triton.client import LLMAPI_DTYPES, contract_of, grpc_inputs, pick_model

    assert pick_model(["tensorrt_llm", "ensemble", "preprocessing"], None) == "ensemble"
    assert pick_model(["tensorrt_llm"], None) == "tensorrt_llm" and pick_model(["x"], "x") == "x"
    with pytest.raises(QueryError, match="no ensemble or tensorrt_llm"):
        pick_model(["other"], None)
    assert contract_of(set(UPSTREAM_INPUTS)) == "llmapi" and contract_of({"text_input", "max_tokens"}) == "ensemble"
    fields = Request("hi", max_tokens=5, stop_words=("a", "b")).llmapi_fields()
    assert fields == {"text_input": "hi", "streaming": True, "sampling_param_max_tokens": 5,
                      "sampling_param_stop": ["a", "b"], "return_finish_reason": True}
    shapes = {t.name(): t.shape() for t in grpc_inputs(fields, LLMAPI_DTYPES, batch=False)}
    assert shapes == {"text_input": [1], "streaming": [1], "sampling_param_max_tokens": [1],
                      "sampling_param_stop": [2], "return_finish_reason": [1]}  # max_batch_size 0: no batch dim


@pytest.mark.slow
def test_stop_request_ends_the_running_request(engine_dir, tmp_path):
    """Upstream's cancellation: a request with `stop` = true and a running request's id ends it; both
    are answered CANCELLED ("Request cancelled by client")."""
    import queue

    import tritonclient.grpc as grpcclient

    from export.triton.client import LLMAPI_DTYPES, grpc_inputs
    from export.triton.server import start_server

    repo = package_repo(engine_dir, tmp_path / "repo", backend="llmapi", tp=1)
    with start_server(repo, timeout=240) as server:
        events: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        try:
            long = Request(PROMPTS[1], max_tokens=200).llmapi_fields()
            client.async_stream_infer("tensorrt_llm", grpc_inputs(long, LLMAPI_DTYPES, batch=False), request_id="r1")
            first, err = events.get(timeout=60)
            assert err is None and first.as_numpy("text_output") is not None
            stop = {"text_input": "", "stop": True}
            client.async_stream_infer("tensorrt_llm", grpc_inputs(stop, LLMAPI_DTYPES, batch=False), request_id="r1")
            errors = []
            while len(errors) < 2:
                _, err = events.get(timeout=30)
                if err is not None:
                    errors.append(str(err))
            assert all("Request cancelled by client" in e for e in errors), errors
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
        assert query(Request(PROMPTS[1], max_tokens=4), url=server.grpc_url, timeout=60).text  # still serving

"""A real tritonserver (the nvidia-pytriton bundle) serving the cpu flavour of a TP=2 engine.

One server for the module. Every query's text must equal the reference runtime's greedy output
decoded by the same tokenizer; bad requests get errors naming the fault while the server keeps
answering good ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from triton_support import make_engine_dir

from export.triton.client import QueryError, Request, StreamSession, grpc_inputs, query, stream_infer

pytestmark = pytest.mark.slow

PROMPTS = ["héllo wörld 中文", "the quick brown fox"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from export.triton.package import package_repo
    from export.triton.server import start_server

    root = tmp_path_factory.mktemp("triton")
    engine_dir = make_engine_dir(root, tp=2)
    repo = package_repo(engine_dir, root / "repo", backend="cpu")
    with start_server(repo, timeout=240) as server:
        yield engine_dir, server
    assert not server.alive()
    assert server.process.returncode == 0, "tritonserver did not stop cleanly (a model outlived its exit timeout)"


@pytest.fixture(scope="module")
def reference(deployment):
    """Greedy text per prompt from the reference runtime on the same rank files (tp=2)."""
    from export.runtime.engine import Engine
    from export.runtime.sampling import SamplingParams
    from export.triton.pipeline import load_tokenizer

    engine_dir, _ = deployment
    tok = load_tokenizer(str(engine_dir / "tokenizer"))
    out = {}
    with Engine.start(engine_dir / "checkpoint") as engine:
        assert engine.mapping.tp == 2
        for p in PROMPTS:
            ids = engine.generate([tok.encode(p)], SamplingParams(MAX_TOKENS, stop_token_ids=(tok.eos_token_id,)))[0]
            ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
            out[p] = (tok.decode(ids), len(ids))
        out["ids"] = ids  # the last prompt's ids, for the end_id test
    out["tokenizer"] = tok
    return out


def url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("stream", [True, False])
def test_text_equals_reference_greedy_output(deployment, reference, model, protocol, stream):
    _, server = deployment
    for prompt in PROMPTS:
        res = query(Request(prompt, max_tokens=MAX_TOKENS, stream=stream, temperature=0.0),
                    url=url(server, protocol), protocol=protocol, model=model, timeout=60)
        text, n = reference[prompt]
        assert res.text == text and res.tokens == n
        assert res.ttft_s is not None and res.tokens_per_s
        if stream:
            assert len(res.pieces) > 1  # pieces really arrived one by one
        else:
            assert len(res.pieces) == 1


def good(server, reference):
    res = query(Request(PROMPTS[1], max_tokens=MAX_TOKENS), url=server.grpc_url, timeout=60)
    assert res.text == reference[PROMPTS[1]][0]


BASE = {"text_input": PROMPTS[0], "max_tokens": 4}
BAD_GRPC = {
    "missing text_input": ({"max_tokens": 4}, {}, "text_input"),
    "max_tokens 0": ({**BASE, "max_tokens": 0}, {}, r"max_tokens must be >= 1 \(got 0\)"),
    "max_tokens above the limit": ({**BASE, "max_tokens": 100000}, {}, r"max_tokens 100000 exceeds the limit"),
    "wrong dtype": ({**BASE, "max_tokens": 4.0}, {"max_tokens": np.float32}, r"max_tokens.*(FP32|INT32)"),
    "invalid UTF-8": ({**BASE, "text_input": b"\xff\xfe oops"}, {}, "text_input: not valid UTF-8"),
    "negative temperature": ({**BASE, "temperature": -1.0}, {}, r"temperature must be >= 0 \(got -1"),
}


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("case", list(BAD_GRPC))
def test_bad_grpc_request_is_answered_and_server_keeps_serving(deployment, reference, model, case):
    _, server = deployment
    fields, dtypes, message = BAD_GRPC[case]
    with pytest.raises(QueryError, match=message):
        stream_infer(grpc_inputs(fields, dtypes), url=server.grpc_url, model=model, timeout=60)
    good(server, reference)


def test_bad_http_requests_and_unknown_model(deployment, reference):
    _, server = deployment
    with pytest.raises(QueryError, match=r"temperature must be >= 0.*HTTP 400"):
        query(Request(PROMPTS[0], max_tokens=4, temperature=-0.5, stream=False), url=server.http_url,
              protocol="http")
    with pytest.raises(QueryError, match=r"max_tokens must be >= 1"):
        query(Request(PROMPTS[0], max_tokens=0, stream=True), url=server.http_url, protocol="http")
    for protocol in ("grpc", "http"):
        with pytest.raises(QueryError, match=r"unknown model|not found"):
            query(Request(PROMPTS[0], max_tokens=4), url=url(server, protocol), protocol=protocol, model="nope")
    good(server, reference)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_one_kept_open_stream_serves_requests_one_after_another(deployment, reference, model):
    """A client keeps its gRPC stream between requests (as `bench serve` does); an error in between
    belongs to that request alone and the stream goes on."""
    _, server = deployment
    with StreamSession(server.grpc_url, model, timeout=120) as session:
        first = session.infer(grpc_inputs(Request(PROMPTS[0], max_tokens=MAX_TOKENS).fields()))
        with pytest.raises(QueryError, match=r"max_tokens must be >= 1"):
            session.infer(grpc_inputs(Request(PROMPTS[1], max_tokens=0).fields()))
        second = session.infer(grpc_inputs(Request(PROMPTS[1], max_tokens=MAX_TOKENS).fields()))
    assert (first.text, first.tokens) == reference[PROMPTS[0]]
    assert (second.text, second.tokens) == reference[PROMPTS[1]]
    assert 0 < first.ttft_s <= first.total_s


def test_concurrent_streams_each_get_their_own_text(deployment, reference):
    from concurrent.futures import ThreadPoolExecutor

    _, server = deployment

    def one(i: int) -> str:
        model = ("ensemble", "tensorrt_llm_bls")[i % 2]
        return query(Request(PROMPTS[i % 2], max_tokens=MAX_TOKENS), url=server.grpc_url, model=model,
                     timeout=120).text

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, range(4)))
    assert texts == [reference[PROMPTS[i % 2]][0] for i in range(4)]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_end_id_from_the_request_ends_generation(deployment, reference, model):
    _, server = deployment
    ids, tok = reference["ids"], reference["tokenizer"]
    end = ids[3]
    res = query(Request(PROMPTS[-1], max_tokens=MAX_TOKENS, end_id=end), url=server.grpc_url, model=model, timeout=60)
    kept = ids[:ids.index(end)]
    assert res.tokens == len(kept) and res.text == tok.decode(kept)


def test_a_cancelled_stream_frees_the_engine(deployment, reference):
    import queue

    import tritonclient.grpc as grpcclient

    _, server = deployment
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("ensemble", grpc_inputs({"text_input": PROMPTS[0], "max_tokens": 200, "stream": True}))
    result, error = got.get(timeout=60)
    assert error is None and result.as_numpy("text_output") is not None  # generation is running
    client.stop_stream(cancel_requests=True)
    client.close()
    good(server, reference)  # the engine lock was released: the next request is served


# ---- hostile requests (issue 15) -------------------------------------------------------------
def test_a_tiny_temperature_harms_no_other_request(deployment, reference):
    """temperature 1e-38 passed validation, its row overflowed to NaN, and the scheduler failed every
    co-batched request; now it is greedy and the others are untouched."""
    from concurrent.futures import ThreadPoolExecutor

    _, server = deployment
    temps = [0.0, 1e-38, 0.0, 1e-38]

    def one(i: int) -> str:
        return query(Request(PROMPTS[i % 2], max_tokens=MAX_TOKENS, temperature=temps[i]), url=server.grpc_url,
                     timeout=120).text

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, range(4)))
    assert texts == [reference[PROMPTS[i % 2]][0] for i in range(4)]


def engine_inputs(ids, length, out_len=4):
    import tritonclient.grpc as grpcclient

    arrays = {"input_ids": np.array([ids], dtype=np.int32), "input_lengths": np.array([[length]], dtype=np.int32),
              "request_output_len": np.array([[out_len]], dtype=np.int32)}
    out = []
    for name, arr in arrays.items():
        t = grpcclient.InferInput(name, list(arr.shape), "INT32")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def test_raw_engine_and_postprocessing_tensors_are_validated(deployment, reference):
    """input_lengths -1 dropped the last prompt token, 10^6 was accepted; postprocessing id -5 failed
    inside the tokenizer. Each now gets an error naming the tensor."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    _, server = deployment
    ids = reference["tokenizer"].encode(PROMPTS[1])
    for length, message in ((-1, r"input_lengths: -1 is outside \[1, "), (10**6, r"input_lengths: 1000000 is outside")):
        with pytest.raises(QueryError, match=message):
            stream_infer(engine_inputs(ids, length), url=server.grpc_url, model="tensorrt_llm", timeout=60)
    with pytest.raises(QueryError, match=r"input_ids: token id -5 outside the vocabulary"):
        stream_infer(engine_inputs([*ids[:-1], -5], len(ids)), url=server.grpc_url, model="tensorrt_llm", timeout=60)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        arrays = {"TOKENS_BATCH": np.array([[[5, -5]]], dtype=np.int32),
                  "SEQUENCE_LENGTH": np.array([[2]], dtype=np.int32)}
        inputs = []
        for name, arr in arrays.items():
            inputs.append(grpcclient.InferInput(name, list(arr.shape), "INT32"))
            inputs[-1].set_data_from_numpy(arr)
        with pytest.raises(InferenceServerException, match=r"TOKENS_BATCH: token id -5 outside the vocabulary"):
            client.infer("postprocessing", inputs, timeout=60)
    finally:
        client.close()
    good(server, reference)


def test_http_max_tokens_over_int32_is_wrapped_by_triton(deployment):
    """What Triton does before our models see the value: JSON max_tokens 4294967301 arrives as INT32 5
    (documented in docs/serving.md; `export.triton.client.Request` refuses such values)."""
    import http.client
    import json

    _, server = deployment
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=60)
    body = {"text_input": PROMPTS[1], "max_tokens": 4294967301, "stream": False}
    conn.request("POST", "/v2/models/tensorrt_llm_bls/generate", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    event = json.loads(resp.read())
    conn.close()
    assert resp.status == 200 and event["num_output_tokens"] == 5


def test_an_oversized_prompt_delays_no_one(deployment, reference):
    """An 8 MB prompt was tokenized (13 s) in the single preprocessing instance before any size check,
    and a concurrent 12-token request waited 11.7 s; now it is refused on its byte size."""
    import statistics
    import threading
    import time

    _, server = deployment
    small = Request(PROMPTS[1], max_tokens=MAX_TOKENS)

    def timed() -> float:
        start = time.perf_counter()
        assert query(small, url=server.grpc_url, timeout=60).text == reference[PROMPTS[1]][0]
        return time.perf_counter() - start

    solo = statistics.median(timed() for _ in range(3))
    errors: list[str] = []

    def huge() -> None:
        try:
            query(Request("a" * (8 << 20), max_tokens=4), url=server.grpc_url, timeout=60)
        except QueryError as e:
            errors.append(str(e))

    t = threading.Thread(target=huge)
    t.start()
    time.sleep(0.05)
    beside = timed()
    t.join(timeout=60)
    assert errors and "text_input: 8388608 bytes exceed the limit" in errors[0]
    assert beside <= 2 * solo, f"small request took {beside:.2f}s beside the 8 MB one, {solo:.2f}s alone"


def test_shared_memory_regions_are_private(deployment):
    """The python backend made its /dev/shm regions 0644, holding prompt text: any local user could read them."""
    import stat

    _, server = deployment
    regions = server.shm_regions()
    assert regions, "no python-backend shm regions found under the server's prefix"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in regions}
    assert all(m == 0o600 for m in modes.values()), modes


def stub_threads(server, model: str) -> int:
    """Threads of `model`'s python stub now."""
    from pathlib import Path

    from export.triton.procs import tree_pids

    (pid,) = [p for p in tree_pids(server.process.pid)
              if f"/{model}/1/model.py" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


@pytest.mark.parametrize("stream", [True, False])
def test_an_engine_error_ends_the_bls_stream_and_leaves_no_thread(deployment, reference, stream):
    """An engine error (the cpu engine refuses bad_words) now reaches the BLS in-band and ends its
    stream, with no thread left behind. Triton 2.51's response iterator delivered such an error when
    it was the first response; mid-stream it was dropped and the BLS hung (reproduced by the killed
    worker in test_serving_faults.py)."""
    import time

    _, server = deployment
    before = stub_threads(server, "tensorrt_llm_bls")
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(QueryError, match="bad_words: not supported by the cpu engine"):
            query(Request(PROMPTS[0], max_tokens=8, bad_words=("fox",), stream=stream), url=server.grpc_url,
                  model="tensorrt_llm_bls", timeout=30)
        assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while stub_threads(server, "tensorrt_llm_bls") > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub_threads(server, "tensorrt_llm_bls") <= before
    good(server, reference)

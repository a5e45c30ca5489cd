"""`query`: one prompt to a served model over gRPC (stream RPC) or HTTP generate, with timings.

The decoupled models reject unary gRPC and HTTP /infer, so gRPC always uses the bidirectional
stream RPC (with `stream` telling the model whether to send pieces or one answer) and HTTP uses
/generate (one response) or /generate_stream (server-sent events, errors checked per event).
"""

from __future__ import annotations

import http.client
import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.errors import ExportError

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}


class QueryError(ExportError):
    """The server answered with an error (its message is kept verbatim)."""


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int = 64
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    stream: bool = True

    def __post_init__(self) -> None:
        """Integers must fit the wire type: Triton converts HTTP JSON numbers to the input's INT32
        before any model sees them, wrapping modulo 2**32 (max_tokens 4294967301 arrives as 5 and is
        served), and numpy wraps the same way for gRPC; so the range is checked here, client-side."""
        for name in ("max_tokens", "top_k", "end_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not -2**31 <= int(value) < 2**31:
                raise ExportError(f"{name} {value} does not fit Triton's INT32 input (the server would see "
                                  f"{(int(value) + 2**31) % 2**32 - 2**31})")
        if self.seed is not None and not 0 <= int(self.seed) < 2**64:
            raise ExportError(f"seed {self.seed} does not fit Triton's UINT64 input")

    def llmapi_fields(self) -> dict[str, Any]:
        """The Triton LLM-API model's inputs (TensorRT-LLM's llmapi config.pbtxt), absent ones left out."""
        unsupported = [n for n in ("end_id", "pad_id") if getattr(self, n) is not None] + \
            (["bad_words"] if self.bad_words else [])
        if unsupported:
            raise ExportError(f"the LLM-API model has no input for {', '.join(unsupported)}")
        out = {"text_input": self.prompt, "streaming": self.stream, "sampling_param_max_tokens": self.max_tokens,
               "sampling_param_temperature": self.temperature, "sampling_param_top_k": self.top_k,
               "sampling_param_top_p": self.top_p, "sampling_param_seed": self.seed,
               "sampling_param_stop": list(self.stop_words) or None, "return_finish_reason": True}
        return {k: v for k, v in out.items() if v is not None}

    def fields(self) -> dict[str, Any]:
        """Ensemble inputs by name, absent ones left out."""
        out = {"text_input": self.prompt, "max_tokens": self.max_tokens, "stream": self.stream,
               "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed,
               "end_id": self.end_id, "pad_id": self.pad_id,
               "stop_words": list(self.stop_words) or None, "bad_words": list(self.bad_words) or None}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class QueryResult:
    """`tokens` counts the tokens the server reported (`num_output_tokens`); the LLM-API contract
    reports none, so there it counts the responses that carried new text."""

    text: str = ""
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    streamed: bool = True
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (seconds since send, tokens) per response
    finish_reason: str | None = None  # LLM-API contract: 'stop' | 'length' | 'cancelled'

    @property
    def tokens_per_s(self) -> float | None:
        """Streaming: decode rate after the first token (the prefill is in ttft); else tokens / total."""
        if not self.streamed:
            return self.tokens / self.total_s if self.tokens and self.total_s > 0 else None
        if self.ttft_s is None or self.tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.total_s - self.ttft_s)

    def summary(self) -> str:
        ttft = f"{self.ttft_s * 1000:.0f} ms" if self.ttft_s is not None else "n/a"
        rate = f"{self.tokens_per_s:.1f} tokens/s" if self.tokens_per_s else "n/a tokens/s"
        return f"{self.tokens} tokens, time to first token {ttft}, {rate}, total {self.total_s:.2f} s"


# numpy dtype of each ensemble input (the wire shape is [1, n])
DTYPES = {"text_input": object, "max_tokens": np.int32, "stream": bool, "temperature": np.float32,
          "top_k": np.int32, "top_p": np.float32, "seed": np.uint64, "end_id": np.int32, "pad_id": np.int32,
          "stop_words": object, "bad_words": object}


# the LLM-API model's inputs (max_batch_size 0: the wire shape is [n], no batch dimension)
LLMAPI_DTYPES = {"text_input": object, "streaming": bool, "sampling_param_max_tokens": np.int32,
                 "sampling_param_temperature": np.float32, "sampling_param_top_k": np.int32,
                 "sampling_param_top_p": np.float32, "sampling_param_seed": np.uint64, "sampling_param_stop": object,
                 "return_finish_reason": bool, "stop": bool}
CONTRACTS = ("ensemble", "llmapi")  # ensemble and BLS speak the same one
LLMAPI_MODEL = "tensorrt_llm"


def contract_of(input_names: set[str]) -> str:
    """Which request contract a model's config declares: the LLM-API model's has `sampling_param_*`."""
    return "llmapi" if "sampling_param_max_tokens" in input_names else "ensemble"


def pick_model(ready: list[str], model: str | None) -> str:
    """`model`, else the repository's client-facing model: `ensemble` where there is one, else the
    LLM-API layout's single `tensorrt_llm`."""
    if model:
        return model
    for name in ("ensemble", LLMAPI_MODEL):
        if name in ready:
            return name
    raise QueryError(f"no ensemble or {LLMAPI_MODEL} model on the server (models: {', '.join(ready) or 'none'}); "
                     f"name one with --model")


def grpc_inputs(fields: dict[str, Any], dtypes: dict[str, Any] | None = None, batch: bool = True) -> list:
    """[1, n] tensors for the ensemble/BLS inputs (`dtypes` overrides the numpy dtype per name);
    `batch` False: [n] tensors (a model with max_batch_size 0, as the LLM-API model)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, value in fields.items():
        vals = value if isinstance(value, list) else [value]
        dtype = (dtypes or {}).get(name) or DTYPES[name]
        if dtype is object:
            vals = [v.encode("utf-8") if isinstance(v, str) else v for v in vals]
        arr = np.array([vals] if batch else vals, dtype=dtype)
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def query(request: Request, *, url: str | None = None, protocol: str = "grpc", model: str | None = None,
          on_text: Callable[[str], None] | None = None, timeout: float = 300.0) -> QueryResult:
    """Send `request` to `model` (default: the repository's ensemble, else its LLM-API model) in the
    contract that model's config declares; `on_text` gets each piece of text as it arrives. Raises QueryError."""
    run = {"grpc": _query_grpc, "http": _query_http}.get(protocol)
    if run is None:
        raise ExportError(f"protocol must be grpc or http, got {protocol!r}")
    return run(request, url or DEFAULT_URLS[protocol], model, on_text or (lambda s: None), timeout)


def _collect(result: QueryResult, start: float, text: str, tokens: int, on_text: Callable[[str], None]) -> None:
    now = time.perf_counter() - start
    if tokens and result.ttft_s is None:
        result.ttft_s = now
    if tokens:
        result.arrivals.append((now, tokens))
    result.tokens += tokens
    if text:
        result.pieces.append(text)
        on_text(text)


def _collect_cumulative(result: QueryResult, start: float, text: str, on_text: Callable[[str], None]) -> None:
    """The LLM-API model's `text_output` is the text generated so far: pass on only what is new."""
    seen = "".join(result.pieces)
    if text.startswith(seen):
        delta = text[len(seen):]
    else:  # the model revised its text (never seen here): emit from where the two differ
        i = next((k for k, (a, b) in enumerate(zip(seen, text, strict=False)) if a != b), min(len(seen), len(text)))
        delta = text[i:]
    _collect(result, start, delta, 1 if delta else 0, on_text)


def _query_grpc(request: Request, url: str, model: str | None, on_text: Callable[[str], None],
                timeout: float) -> QueryResult:
    with StreamSession(url, model, timeout=timeout) as session:
        if session.contract == "llmapi":
            inputs = grpc_inputs(request.llmapi_fields(), LLMAPI_DTYPES, batch=False)
        else:
            inputs = grpc_inputs(request.fields())
        result = session.infer(inputs, on_text)
    result.streamed = request.stream
    return result


def stream_infer(inputs: list, *, url: str, model: str, on_text: Callable[[str], None] | None = None,
                 timeout: float = 300.0) -> QueryResult:
    """One request over its own gRPC connection and stream RPC; collects pieces until the final flag."""
    with StreamSession(url, model, timeout=timeout) as session:
        return session.infer(inputs, on_text)


class StreamSession:
    """One gRPC connection with one open stream RPC, for requests sent one after another.

    A serving client keeps its channel open between requests (as perf_analyzer and
    genai-perf do); `infer`'s clock starts when the request is sent, so a request's timings hold
    no connection setup."""

    def __init__(self, url: str, model: str | None = None, *, timeout: float = 300.0) -> None:
        """`model` None: the repository's ensemble, else its LLM-API model. `contract` is what the
        model's config declares ("ensemble" for ensemble and BLS, "llmapi")."""
        import tritonclient.grpc as grpcclient

        self.timeout, self.url, self._sent = timeout, url, 0
        self._in_flight = False  # a request whose final response has not arrived
        self._events: queue.Queue = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        _check_reachable(self._client, url)
        self.model, self.contract = self._resolve(model)
        self._client.start_stream(callback=lambda result, error: self._events.put((result, error)))

    def _resolve(self, model: str | None) -> tuple[str, str]:
        try:
            if not model:
                index = self._client.get_model_repository_index().models
                model = pick_model([m.name for m in index if m.state == "READY"], None)
            config = self._client.get_model_config(model).config
        except QueryError:
            raise
        except Exception as e:  # InferenceServerException: no such model
            raise QueryError(f"{model}: {_message(e)}") from None
        return model, contract_of({i.name for i in config.input})

    def infer(self, inputs: list, on_text: Callable[[str], None] | None = None) -> QueryResult:
        """Send one request and collect its responses until the final flag. Raises QueryError."""
        on_text = on_text or (lambda s: None)
        self._sent += 1
        rid = str(self._sent)
        result, start = QueryResult(), time.perf_counter()
        self._in_flight = True
        try:
            self._client.async_stream_infer(self.model, inputs, request_id=rid, enable_empty_final_response=True)
        except Exception as e:  # InferenceServerException: the stream broke (the server went away); the
            self._in_flight = False  # callback queued the reason, if it gave one
            reason = self._events.get_nowait()[1] if not self._events.empty() else e
            raise QueryError(f"cannot send to {self.model} at {self.url}: {_message(reason)}") from None
        while True:
            try:
                res, err = self._events.get(timeout=self.timeout)
            except queue.Empty:
                raise QueryError(f"no response from {self.model} at {self.url} within {self.timeout:.0f}s") from None
            if err is not None:  # requests go one at a time, so an error is this request's
                self._in_flight = False  # an error response is the request's last
                raise QueryError(f"{self.model}: {_message(err)}")
            response = res.get_response()
            if response.id != rid:
                raise QueryError(f"{self.model}: a response for request {response.id!r} arrived "
                                 f"while waiting for {rid!r}")
            text = res.as_numpy("text_output")
            if text is not None and self.contract == "llmapi":
                _collect_cumulative(result, start, b"".join(text.reshape(-1)).decode("utf-8"), on_text)
                reason = res.as_numpy("finish_reason")
                if reason is not None and reason.size:
                    value = reason.reshape(-1)[0]
                    value = value.decode() if isinstance(value, bytes) else str(value)
                    result.finish_reason = None if value == "None" else value
            elif text is not None:
                n = res.as_numpy("num_output_tokens")
                _collect(result, start, b"".join(text.reshape(-1)).decode("utf-8"),
                         int(n.reshape(-1)[0]) if n is not None else 0, on_text)
            if response.parameters["triton_final_response"].bool_param:
                break
        self._in_flight = False
        result.total_s = time.perf_counter() - start
        result.text = "".join(result.pieces)
        return result

    def close(self) -> None:
        """End the stream: cancel a request still running (the server frees its slot); otherwise
        half-close and let the server finish the RPC. Cancelling an RPC whose requests have all
        answered races the server's release of the ensemble's request: tritonserver 2.51 then kept
        `ensemble` loaded at shutdown and exited 1 after its 10 s exit timeout (3 of 7 stops
        measured; 0 of 12 since)."""
        try:
            self._client.stop_stream(cancel_requests=self._in_flight)
        finally:
            self._client.close()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message(err: object) -> str:
    """An InferenceServerException's own text (its str() carries a prefix and the gRPC status)."""
    return " ".join(str(err.message() if hasattr(err, "message") else err).split())


def _check_reachable(client: Any, url: str) -> None:
    """Ask once before streaming: an unreachable server otherwise surfaces as a race between the
    stream's callback and the send ("the stream is no longer in valid state"), not as its cause."""
    try:
        live = client.is_server_live()
    except Exception as e:  # InferenceServerException: connection refused, DNS, TLS...
        raise QueryError(f"cannot reach a Triton server at {url}: {_message(e)}") from None
    if not live:
        raise QueryError(f"the Triton server at {url} is not live")


def _http_json(host: str, port: int, method: str, path: str, timeout: float) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
    except OSError as e:
        raise QueryError(f"cannot reach {host}:{port}: {e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise QueryError(f"{path}: {body.get('error', body) if isinstance(body, dict) else body} (HTTP {resp.status})")
    return body


def _query_http(request: Request, url: str, model: str | None, on_text: Callable[[str], None],
                timeout: float) -> QueryResult:
    host, _, port = url.removeprefix("http://").partition(":")
    port_n = int(port or 8000)
    if not model:
        index = _http_json(host, port_n, "POST", "/v2/repository/index", timeout)
        model = pick_model([m["name"] for m in index if m.get("state") == "READY"], None)
    config = _http_json(host, port_n, "GET", f"/v2/models/{model}/config", timeout)
    llmapi = contract_of({i["name"] for i in config.get("input", [])}) == "llmapi"
    conn = http.client.HTTPConnection(host, port_n, timeout=timeout)
    route = "generate_stream" if request.stream else "generate"
    result, start = QueryResult(), time.perf_counter()
    try:
        conn.request("POST", f"/v2/models/{model}/{route}",
                     body=json.dumps(request.llmapi_fields() if llmapi else request.fields()),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        events = _sse_events(resp) if request.stream else [json.loads(resp.read() or b"{}")]
        for event in events:
            if "error" in event:
                raise QueryError(f"{model}: {event['error']} (HTTP {resp.status})")
            if llmapi:
                text = event.get("text_output", "")
                _collect_cumulative(result, start, "".join(text) if isinstance(text, list) else str(text), on_text)
                reason = event.get("finish_reason")
                reason = reason[0] if isinstance(reason, list) and reason else reason
                result.finish_reason = reason if reason not in (None, "None") else result.finish_reason
                continue
            _collect(result, start, str(event.get("text_output", "")), int(event.get("num_output_tokens", 0)),
                     on_text)
    except OSError as e:
        raise QueryError(f"cannot reach {url}: {e}") from None
    finally:
        conn.close()
    result.total_s = time.perf_counter() - start
    result.text = "".join(result.pieces)
    result.streamed = request.stream
    return result


def _sse_events(resp: http.client.HTTPResponse):
    """`data: {json}` lines of a text/event-stream, as they arrive."""
    if resp.status != 200 and "event-stream" not in (resp.getheader("Content-Type") or ""):
        yield json.loads(resp.read() or b"{}")
        return
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if line.startswith("data:"):
            yield json.loads(line[5:].strip())

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

    def fields(self) -> dict[str, Any]:
        """Ensemble inputs by name, absent ones left out."""
        out = {"text_input": self.prompt, "max_tokens": self.max_tokens, "stream": self.stream,
               "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed,
               "end_id": self.end_id, "pad_id": self.pad_id,
               "stop_words": list(self.stop_words) or None, "bad_words": list(self.bad_words) or None}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class QueryResult:
    text: str = ""
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    streamed: bool = True
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (seconds since send, tokens) per response


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


def grpc_inputs(fields: dict[str, Any], dtypes: dict[str, Any] | None = None) -> list:
    """[1, n] tensors for the ensemble/BLS inputs (`dtypes` overrides the numpy dtype per name)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, value in fields.items():
        vals = value if isinstance(value, list) else [value]
        dtype = (dtypes or {}).get(name) or DTYPES[name]
        if dtype is object:
            vals = [v.encode("utf-8") if isinstance(v, str) else v for v in vals]
        arr = np.array([vals], dtype=dtype)
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def query(request: Request, *, url: str | None = None, protocol: str = "grpc", model: str = "ensemble",
          on_text: Callable[[str], None] | None = None, timeout: float = 300.0) -> QueryResult:
    """Send `request`; `on_text` gets each piece of text as it arrives. Raises QueryError."""
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


def _query_grpc(request: Request, url: str, model: str, on_text: Callable[[str], None],
                timeout: float) -> QueryResult:
    result = stream_infer(grpc_inputs(request.fields()), url=url, model=model, on_text=on_text, timeout=timeout)
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

    def __init__(self, url: str, model: str, *, timeout: float = 300.0) -> None:
        import tritonclient.grpc as grpcclient

        self.model, self.timeout, self.url, self._sent = model, timeout, url, 0
        self._in_flight = False  # a request whose final response has not arrived
        self._events: queue.Queue = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        _check_reachable(self._client, url)
        self._client.start_stream(callback=lambda result, error: self._events.put((result, error)))

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
            if text is not None:
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


def _query_http(request: Request, url: str, model: str, on_text: Callable[[str], None],
                timeout: float) -> QueryResult:
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port or 8000), timeout=timeout)
    route = "generate_stream" if request.stream else "generate"
    result, start = QueryResult(), time.perf_counter()
    try:
        conn.request("POST", f"/v2/models/{model}/{route}", body=json.dumps(request.fields()),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        events = _sse_events(resp) if request.stream else [json.loads(resp.read() or b"{}")]
        for event in events:
            if "error" in event:
                raise QueryError(f"{model}: {event['error']} (HTTP {resp.status})")
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

"""What every python model in `triton_repo/` does with Triton's API, in one place.

`triton_python_backend_utils` exists only inside the python-backend stub, so the models pass it in
(`pb`) rather than this module importing it; that keeps `export` importable (and these helpers
testable) anywhere. Only the sys.path bootstrap stays in each model file: it is what makes this
module importable there.
"""

from __future__ import annotations

import faulthandler
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

REPO_PATHS = ("tokenizer_dir", "checkpoint_dir")  # parameters `package` writes relative to the repository


def resolve_paths(params: dict[str, str], args: dict[str, str]) -> dict[str, str]:
    """The model's parameters with repository-relative paths made absolute against the repository
    it was loaded from (`args["model_repository"]` is the model's own directory in the python
    backend), so a packaged repository can be moved or mounted anywhere."""
    model_dir = args["model_repository"]
    root = os.path.dirname(model_dir) if os.path.basename(model_dir) == args.get("model_name") else model_dir
    return {k: os.path.join(root, v) if k in REPO_PATHS and v and not os.path.isabs(v) else v
            for k, v in params.items()}


def model_params(args: dict[str, str]) -> dict[str, str]:
    """A python model's config parameters (string values), repository paths resolved.

    Every model calls this first in `initialize`, so it is also where a crash is made legible: the
    stub ignores PYTHONFAULTHANDLER, and without `faulthandler` a stub that segfaults leaves only
    Triton's "stub process is not healthy", never which Python code was running.
    """
    faulthandler.enable()  # to the stub's stderr: the server log
    cfg = json.loads(args["model_config"])
    return resolve_paths({k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}, args)


def serve_in_thread(serve: Callable[[Any], None], request: Any, threads: set[threading.Thread]) -> None:
    """A decoupled model answers each request from a thread of its own, so `execute` returns at
    once and requests run side by side; `threads` is what `finalize` joins (`serve` discards its own)."""
    t = threading.Thread(target=serve, args=(request,), daemon=True)
    threads.add(t)
    t.start()


def at_most_every(interval_s: float, check: Callable[[], bool]) -> Callable[[], bool]:
    """`check` (a cancellation probe that stays true once true) called at most once per `interval_s`.

    The python backend's `is_cancelled()` is a round trip to the server process (0.15 ms p50 measured
    in the engine model, asked before every streamed token), CPU the serving path shares with the
    engine on a small host. Asked at most every `interval_s`, a client's cancel is seen up to that
    much later; the slot is freed at the engine's next step after that."""
    state = {"next": 0.0, "seen": False}

    def probe() -> bool:
        now = time.monotonic()
        if not state["seen"] and now >= state["next"]:
            state["seen"], state["next"] = bool(check()), now + interval_s
        return state["seen"]

    return probe


def gather(pb: Any, request: Any, names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
    """The request's inputs as numpy arrays; None for optional inputs it did not send."""
    out: dict[str, np.ndarray | None] = {}
    for name in names:
        t = pb.get_input_tensor_by_name(request, name)
        out[name] = None if t is None else t.as_numpy()
    return out


def triton_error(pb: Any, msg: str, code_name: str | None = "INVALID_ARG") -> Any:
    """A TritonError with the code (INVALID_ARG, UNAVAILABLE, CANCELLED, ...) where this Triton has codes."""
    code = getattr(pb.TritonError, code_name, None) if code_name else None
    return pb.TritonError(msg) if code is None else pb.TritonError(msg, code)


def error(pb: Any, msg: str, code_name: str | None = "INVALID_ARG", outputs: dict | None = None) -> Any:
    """An error response (with `outputs`, when the contract sends some alongside the error)."""
    tensors = [pb.Tensor(k, v) for k, v in (outputs or {}).items()]
    return pb.InferenceResponse(output_tensors=tensors, error=triton_error(pb, msg, code_name))


def response(pb: Any, outputs: dict[str, np.ndarray]) -> Any:
    return pb.InferenceResponse([pb.Tensor(k, v) for k, v in outputs.items()])


def stop_engine(pb: Any, engine_model: str, request_id: str) -> None:
    """TensorRT-LLM's stop request: the engine ends its running request with this id (`stop` = true;
    the required inputs are dummies). The engine frees the slot at its next step."""
    dummy = {"input_ids": [[0]], "input_lengths": [[1]], "request_output_len": [[1]]}
    inputs = [pb.Tensor(k, np.array(v, dtype=np.int32)) for k, v in dummy.items()]
    inputs.append(pb.Tensor("stop", np.array([[True]], dtype=bool)))
    for _ in pb.InferenceRequest(model_name=engine_model, inputs=inputs, request_id=request_id,
                                 requested_output_names=["output_ids"]).exec(decoupled=True):
        pass

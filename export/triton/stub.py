"""What every python model in `triton_repo/` does with Triton's API, in one place.

`triton_python_backend_utils` exists only inside the python-backend stub, so the models pass it in
(`pb`) rather than this module importing it; that keeps `export` importable (and these helpers
testable) anywhere. Only the sys.path bootstrap stays in each model file: it is what makes this
module importable there.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def gather(pb: Any, request: Any, names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
    """The request's inputs as numpy arrays; None for optional inputs it did not send."""
    out: dict[str, np.ndarray | None] = {}
    for name in names:
        t = pb.get_input_tensor_by_name(request, name)
        out[name] = None if t is None else t.as_numpy()
    return out


def error(pb: Any, msg: str, code_name: str | None = "INVALID_ARG") -> Any:
    """An error response; the code (INVALID_ARG, UNAVAILABLE, ...) where this Triton has codes."""
    code = getattr(pb.TritonError, code_name, None) if code_name else None
    err = pb.TritonError(msg) if code is None else pb.TritonError(msg, code)
    return pb.InferenceResponse(output_tensors=[], error=err)


def response(pb: Any, outputs: dict[str, np.ndarray]) -> Any:
    return pb.InferenceResponse([pb.Tensor(k, v) for k, v in outputs.items()])

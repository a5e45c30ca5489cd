"""Fill `triton_repo/` config templates from typed values, and prove the result parses.

Unlike tensorrtllm_backend's `fill_template.py` (`safe_substitute`, which leaves `${key}` behind
for Triton to reject later with "Expected integer, got: $"), a missing value fails here naming
the file and the key, and every rendered config.pbtxt is parsed with Triton's own protobuf schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from export.errors import ExportError

PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


class RenderError(ExportError):
    """A template could not be rendered: names the file and the key."""


def fill(template: str, values: Mapping[str, str | None], where: str) -> str:
    """Substitute every `${key}`; all keys without a value are reported at once."""
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        value = values.get(m[1])
        if value is None:
            missing.append(m[1])
            return m[0]
        return str(value)

    text = PLACEHOLDER.sub(sub, template)
    if missing:
        keys = ", ".join(repr(k) for k in dict.fromkeys(missing))
        raise RenderError(f"{where}: required value(s) {keys} missing")
    left = PLACEHOLDER.search(text)
    if left:
        raise RenderError(f"{where}: placeholder '${{{left[1]}}}' is left after rendering")
    return text


def parse_model_config(text: str, where: str, expect_name: str | None = None):  # -> ModelConfig
    """Parse with Triton's `ModelConfig` message; the name must match its directory."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise RenderError(f"{where}: not a valid Triton model config: {e}") from None
    if expect_name is not None and cfg.name != expect_name:
        raise RenderError(f"{where}: model name {cfg.name!r} does not match its directory {expect_name!r}")
    return cfg


def pbtxt_bool(v: bool) -> str:
    return "true" if v else "false"

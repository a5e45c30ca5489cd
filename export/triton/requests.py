"""Request validation and tensor preparation shared by the python models (no Triton imports).

Each function takes plain numpy arrays (None for an absent optional input) and raises
`RequestError` naming the input at fault, which the model returns as that request's error while
the server keeps serving. The sampling rules are `SamplingParams`' own (`request_params` builds it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.runtime.params import BadSamplingParams, SamplingParams


class RequestError(ValueError):
    """A bad request: the message names the input and the rule it broke."""


# A bound on UTF-8 bytes per prompt token, for the size check done before tokenizing: English
# averages ~4 bytes per BPE token and code with long whitespace runs ~10; a prompt above
# max_input_len x this many bytes could not fit anyway, and refusing it costs microseconds, where
# tokenizing 8 MB took 13 s in the single preprocessing instance (blocking every other request).
BYTES_PER_TOKEN = 16
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    max_input_len: int
    max_seq_len: int
    max_input_bytes: int = 0  # 0: max_input_len x BYTES_PER_TOKEN

    @property
    def input_bytes(self) -> int:
        return self.max_input_bytes or self.max_input_len * BYTES_PER_TOKEN


def scalar(arr: np.ndarray | None, name: str, default: Any = None, row: int = 0) -> Any:
    """Row `row` of a [batch, 1] (or [batch]) input as a Python scalar; `default` when absent."""
    if arr is None:
        return default
    a = np.asarray(arr)
    if a.ndim == 0:
        return a.item()
    flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    if flat.shape[1] != 1:
        raise RequestError(f"{name}: expected one value per batch row, got shape {list(a.shape)}")
    return flat[row, 0].item()


def decode_text(value: Any, name: str = "text_input") -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def check_text_bytes(arr: np.ndarray | None, name: str, limit: int) -> None:
    """Refuse a STRING input whose element exceeds `limit` bytes, before anything decodes it."""
    if arr is None:
        return
    for v in np.asarray(arr, dtype=object).reshape(-1):
        n = len(v.encode("utf-8")) if isinstance(v, str) else len(v)
        if n > limit:
            raise RequestError(f"{name}: {n} bytes exceed the limit of {limit} bytes (max_input_len x "
                               f"{BYTES_PER_TOKEN} bytes per token, or the model's max_input_bytes); "
                               f"such a prompt could not fit")


def check_ids(ids: Sequence[int], name: str, vocab: int | None) -> None:
    """Token ids must be vocabulary indices (a negative id wraps in numpy, and fails far away)."""
    if vocab is None:
        return
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"{name}: token id {bad[0]} outside the vocabulary [0, {vocab})")


def check_length(length: Any, name: str, width: int, low: int = 1) -> int:
    """A length input must lie within the tensor it describes ([low, width])."""
    n = int(length)
    if not low <= n <= width:
        raise RequestError(f"{name}: {n} is outside [{low}, {width}] (the ids tensor holds {width} tokens)")
    return n


def request_params(names: dict[str, str], prompt_len: int, limits: Limits, **values: Any) -> SamplingParams:
    """One request's `SamplingParams`, built once here from its inputs (`names`: setting -> input
    name, for the errors), its prompt held to max_input_len and prompt + max_tokens to max_seq_len
    (`length_problem`, the rule the engine applies with the same limit). RequestError names the input."""
    if values.get("max_tokens") is None:
        raise RequestError(f"{names.get('max_tokens', 'max_tokens')}: required input is missing")
    try:
        params = SamplingParams.from_request(names, **values)
    except BadSamplingParams as e:
        raise RequestError("; ".join(e.problems)) from None
    if prompt_len > limits.max_input_len:
        raise RequestError(f"text_input: {prompt_len} prompt tokens exceed max_input_len {limits.max_input_len}")
    problem = params.length_problem(prompt_len, limits.max_seq_len)
    if problem:
        raise RequestError(problem)
    return params


def word_list(words: Sequence[str], encode: Any) -> np.ndarray:
    """tensorrtllm_backend's [2, L] format: concatenated ids, then cumulative end offsets (-1 padded)."""
    ids: list[int] = []
    offsets: list[int] = []
    for w in words:
        if not w:
            continue
        ids += list(encode(w))
        offsets.append(len(ids))
    out = np.zeros((2, len(ids)), dtype=np.int32)
    if ids:
        out[0, :len(ids)] = ids
        out[1, :] = -1
        out[1, :len(offsets)] = offsets
    return out


def split_word_list(arr: np.ndarray | None) -> list[list[int]]:
    """Inverse of `word_list` for one request ([2, L] or [1, 2, L])."""
    if arr is None:
        return []
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[0]
    if a.size == 0:
        return []
    ids, offsets = a[0].tolist(), [o for o in a[1].tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if end > start:
            words.append(ids[start:end])
        start = end
    return words


def stack_word_lists(lists: list[np.ndarray]) -> np.ndarray:
    """[batch, 2, L] padded with 0 (ids) and -1 (offsets)."""
    width = max((x.shape[1] for x in lists), default=0)
    out = np.zeros((len(lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for i, x in enumerate(lists):
        out[i, :, :x.shape[1]] = x
    return out


def text_rows(arr: np.ndarray | None, name: str) -> list[list[str]]:
    """A [batch, n] STRING input as per-row lists of str (bad UTF-8 named)."""
    if arr is None:
        return []
    a = np.asarray(arr, dtype=object)
    a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    return [[decode_text(v, name) for v in row] for row in a]

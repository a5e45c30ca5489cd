"""The request contract: `SamplingParams`, its rules, and the one request-length rule.

Every front end (the Triton models' requests, the CLI's flags) builds one `SamplingParams` with
`from_request`, naming its inputs, and gets back errors that name them; the rules live only in
the constructor. The engine applies `length_problem` with the one limit it is given (the build's
max_seq_len). No torch here: the preprocessing model validates requests without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from export.errors import ExportError

# Below this a temperature is greedy: the sampled distribution is already one-hot to fp32 precision
# for any logit gap above ~1e-3, and dividing by smaller values overflows fp32 (HF's
# `do_sample=False` and vLLM's `_SAMPLING_EPS = 1e-5` draw the same line).
MIN_TEMPERATURE = 1e-5


class BadSamplingParams(ExportError):
    """Settings that break a rule; `problems` has one line per rule, each naming the setting as the
    request called it (a Triton input, a CLI flag), so a server can answer with exactly those lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("bad sampling parameters: " + "; ".join(problems))
        self.problems = problems


# How a request's raw values become settings (Triton inputs arrive as numpy scalars, CLI flags as str).
_CONVERT = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float,
            "seed": lambda v: None if v is None else int(v), "stop_token_ids": tuple,
            "stop_sequences": lambda v: tuple(tuple(s) for s in v)}


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings, and the one place their rules live.

    Build it with `from_request` where the values come from a user (a Triton request, CLI flags):
    `names` then says what each setting is called there, and every error (these rules, and the
    length rule the engine applies, `length_problem`) names it that way.
    """

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # generation stops after emitting one of these (it is included)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # ... or when the output ends with one of these (included)
    # setting -> what the request called it; not a setting (no part in equality)
    names: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        n = self.name
        problems = [msg for bad, msg in (
            (self.max_tokens < 1, f"{n('max_tokens')} must be >= 1 (got {self.max_tokens})"),
            (not self.temperature >= 0, f"{n('temperature')} must be >= 0 (got {self.temperature})"),  # NaN too
            (math.isinf(self.temperature), f"{n('temperature')} must be finite (got {self.temperature})"),
            (self.top_k < 0, f"{n('top_k')} must be >= 0 (got {self.top_k})"),
            (not 0 < self.top_p <= 1, f"{n('top_p')} must be in (0, 1] (got {self.top_p})"),  # False for NaN
            (any(not s for s in self.stop_sequences), f"{n('stop_sequences')} must not contain an empty sequence"),
        ) if bad]
        if problems:
            raise BadSamplingParams(problems)

    @classmethod
    def from_request(cls, names: dict[str, str], **values: Any) -> SamplingParams:
        """The settings of one user request, each converted to its type; a value None keeps the
        default. `names` maps a setting to its input / flag name, for the errors."""
        given = {k: _CONVERT[k](v) for k, v in values.items() if v is not None}
        return cls(**given, names=tuple(names.items()))

    def name(self, setting: str) -> str:
        """What the request called `setting` (the setting's own name by default)."""
        return dict(self.names).get(setting, setting)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def length_problem(self, prompt_len: int, max_seq_len: int, limit: str = "max_seq_len") -> str | None:
        """`length_problem` for this request's max_tokens, named as the request named it."""
        return length_problem(prompt_len, self.max_tokens, max_seq_len, limit, self.name("max_tokens"))


def length_problem(prompt_len: int, max_tokens: int, max_seq_len: int, limit: str = "max_seq_len",
                   name: str = "max_tokens") -> str | None:
    """The one request-length rule: prompt + new tokens fit in `max_seq_len` (the build's, which the
    Triton configs and the engine are given; `limit` says which setting it is). None when they fit;
    else the line to refuse the request with. `max_tokens` 0 asks only that the prompt fits (logits)."""
    room = max_seq_len - prompt_len
    if max_tokens <= room and prompt_len <= max_seq_len:
        return None
    if max_tokens == 0:
        return f"{prompt_len} prompt tokens exceed {limit} {max_seq_len}"
    return f"{name} {max_tokens} exceeds the limit {room} ({limit} {max_seq_len} - {prompt_len} prompt tokens)"

"""Token selection: greedy, or temperature / top-k / top-p sampling with a seeded generator.

Settings are checked numerically, not only by sign: a temperature below `MIN_TEMPERATURE` is greedy
(logits / 1e-38 overflow fp32 to inf, and softmax of inf is NaN), and NaN / inf settings are refused.
Logits a row cannot be sampled from (NaN, +inf, or nothing finite) raise `SamplingError` for that
row, so the scheduler can fail that request alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from export.errors import ExportError

# Below this a temperature is greedy: the sampled distribution is already one-hot to fp32 precision
# for any logit gap above ~1e-3, and dividing by smaller values overflows fp32 (HF's
# `do_sample=False` and vLLM's `_SAMPLING_EPS = 1e-5` draw the same line).
MIN_TEMPERATURE = 1e-5


class SamplingError(ExportError):
    """This request's row cannot be sampled (non-finite logits); the request fails, the batch goes on."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # generation stops after emitting one of these (it is included)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # ... or when the output ends with one of these (included)

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.max_tokens < 1, f"max_tokens must be >= 1 (got {self.max_tokens})"),
            (not (math.isfinite(self.temperature) and self.temperature >= 0),
             f"temperature must be a finite number >= 0 (got {self.temperature})"),
            (self.top_k < 0, f"top_k must be >= 0 (got {self.top_k})"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),  # False for NaN
            (any(not s for s in self.stop_sequences), "stop_sequences must not contain an empty sequence"),
        ) if bad]
        if problems:
            raise ExportError("bad sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """One generator per request so a seed reproduces a generation whatever else runs."""
    if params.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus; [B, V] in, [B, V] out."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top one always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_logits(logits: torch.Tensor) -> None:
    """Raise SamplingError unless every row has no NaN, no +inf and at least one finite logit
    (-inf is a masked token and fine): argmax over NaN picks a garbage token, multinomial raises."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)
    if bool(bad.any()):
        raise SamplingError(f"the model produced non-finite logits for this request "
                            f"(row {int(bad.nonzero()[0, 0])}: NaN, +inf, or no finite value)")


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> list[int]:
    """One token per row of fp32 `logits` [B, V]; SamplingError if a row cannot be sampled."""
    check_logits(logits)
    if params.greedy:
        return logits.argmax(-1).tolist()
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = scaled.softmax(-1)
    check_logits(probs.log())  # a huge logit / temperature can still overflow to inf: NaN probabilities
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).tolist()

"""Token selection: greedy, or temperature / top-k / top-p sampling with a seeded generator.

The settings are `SamplingParams` (the request contract, `export.runtime.params`; re-exported
here). They are checked numerically, not only by sign: a temperature below `MIN_TEMPERATURE` is greedy
(logits / 1e-38 overflow fp32 to inf, and softmax of inf is NaN), and NaN / inf settings are refused.
Logits a row cannot be sampled from (NaN, +inf, or nothing finite) raise `SamplingError` for that
row, so the scheduler can fail that request alone.
"""

from __future__ import annotations

import math

import torch

from export.errors import ExportError
from export.runtime.params import MIN_TEMPERATURE, BadSamplingParams, SamplingParams, length_problem

__all__ = [
    "MIN_TEMPERATURE",
    "BadSamplingParams",
    "SamplingError",
    "SamplingParams",
    "check_logits",
    "filter_logits",
    "length_problem",
    "make_generator",
    "sample",
]


class SamplingError(ExportError):
    """This request's row cannot be sampled (non-finite logits); the request fails, the batch goes on."""


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
    (-inf is a masked token and fine): argmax over NaN picks a garbage token, multinomial raises.
    The usual case costs one reduction: a NaN or an inf anywhere makes the sum NaN or inf, so a finite
    sum means every logit is finite (at 16 rows the three per-element checks cost ~0.6 ms a step)."""
    if math.isfinite(float(logits.sum())):
        return
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

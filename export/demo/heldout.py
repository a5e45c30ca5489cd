"""The held-out text and the one held-out metric every stage reports.

The same tokens (held-out stdlib files, in path order, each wrapped in bos/eos) serve the model
cards, the tests, fusion's quality checks and the demo, so their perplexities are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from export.demo.corpus import corpus_files, split
from export.demo.tokenizer import BOS_ID, EOS_ID

Logits = Callable[[torch.Tensor], torch.Tensor]  # input ids [B, T] -> logits [B, T, V]
TEST_SLICE_TOKENS = 4096  # the small fixed slice the tests and cards quote
EVAL_TOKENS = 32768  # the card's main held-out figure


def encode(tokenizer: Any, text: str) -> list[int]:
    """Ids without special tokens, from a `tokenizers.Tokenizer` or a transformers tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text).ids
    return tokenizer.encode(text, add_special_tokens=False)


def load_tokenizer(directory: str | Path) -> Any:
    from export.io.tokenizer import load_tokenizer as load

    return load(None, directory)


def document_tokens(tokenizer: Any, text: str) -> list[int]:
    return [BOS_ID, *encode(tokenizer, text), EOS_ID]


def heldout_tokens(tokenizer: Any, n_tokens: int) -> list[int]:
    """The first `n_tokens` of the held-out stream (tokenizer object or directory)."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    out: list[int] = []
    for f in split(corpus_files())[1]:
        text = f.text()
        if text:
            out += document_tokens(tokenizer, text)
        if len(out) >= n_tokens:
            return out[:n_tokens]
    raise ValueError(f"the held-out split has only {len(out)} tokens, fewer than {n_tokens}")


def windows(tokens: list[int], ctx: int) -> torch.Tensor:
    """Non-overlapping [N, ctx+1] windows: inputs are [:, :-1], targets [:, 1:]."""
    n = len(tokens) // (ctx + 1)
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens do not fill one window of {ctx + 1}")
    return torch.tensor(tokens[: n * (ctx + 1)], dtype=torch.long).view(n, ctx + 1)


@torch.no_grad()
def mean_nll(logits_fn: Logits, batches: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats) over all windows."""
    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        b = batches[i: i + batch_size]
        logits = logits_fn(b[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += b[:, 1:].numel()
    return total / count


def heldout_loss(logits_fn: Logits, tokenizer: Any, n_tokens: int = TEST_SLICE_TOKENS, ctx: int = 256) -> float:
    return mean_nll(logits_fn, windows(heldout_tokens(tokenizer, n_tokens), ctx))


def perplexity(nll: float) -> float:
    return math.exp(nll)

"""The Puzzle-style step: remove attention from the least important contiguous middle run.

Importance of layer i's attention = held-out loss with that attention skipped minus the base loss
(a layer whose removal barely hurts is redundant). The run of `length` middle layers with the
smallest summed importance loses its attention; distillation (KL to the unpruned teacher's
next-token distribution) then recovers the quality, as for the paper's 49B and Ultra parents.
"""

from __future__ import annotations

import torch

from export.demo.heldout import mean_nll
from export.demo.hf_model import SkipAttention, logits_fn


def attention_importance(model: torch.nn.Module, heldout: torch.Tensor) -> tuple[float, list[float]]:
    """(base held-out loss, per-layer loss increase when only that layer's attention is skipped)."""
    base = mean_nll(logits_fn(model), heldout)
    scores = []
    for block in model.model.layers:
        kept = block.self_attn
        block.self_attn = SkipAttention()
        try:
            scores.append(mean_nll(logits_fn(model), heldout) - base)
        finally:
            block.self_attn = kept
    return base, scores


def choose_run(scores: list[float], length: int = 4, edge: int = 1) -> list[int]:
    """The contiguous `length` layers, not within `edge` of either end, with the least total importance."""
    n = len(scores)
    starts = range(edge, n - edge - length + 1)
    if not starts:
        raise ValueError(f"{n} layers leave no run of {length} middle layers (edge {edge})")
    best = min(starts, key=lambda s: (sum(scores[s: s + length]), s))
    return list(range(best, best + length))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged."""
    v = student_logits.shape[-1]
    s = torch.log_softmax(student_logits.float().reshape(-1, v), -1)
    t = torch.log_softmax(teacher_logits.float().reshape(-1, v), -1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")

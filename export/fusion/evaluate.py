"""How much a candidate (fused, pruned, distilled) model differs from its base, on held-out text.

Per model: perplexity of the next token; against BASE, the mean KL(P_base || P_candidate) of the
next-token distributions and the top-1 agreement (all positions of all sequences, equal weight);
and the structure that sets its speed: layer count and sync points (all-reduces) per token.
Models are loaded one candidate at a time beside the base.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from export.errors import ExportError
from export.fusion.calib import load_model, non_empty_layers, token_batch
from export.io.tokenizer import load_tokenizer
from export.mapping import Mapping
from export.progress import item_progress
from export.tensors import parameter_count


@dataclass
class Score:
    name: str
    layers: int
    non_empty_layers: int
    attention_layers: int
    ffn_layers: int
    sync_points_per_token: int
    parameters: int
    perplexity: float
    kl_vs_base: float
    top1_agreement: float
    tokens: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def _logits(dec, ids: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [dec(b).float() for b in ids.split(batch)]


def _compare(base: list[torch.Tensor], cand: list[torch.Tensor], ids: torch.Tensor, batch: int):
    """(perplexity, mean KL(base || cand), top-1 agreement) over all positions."""
    nll = kl = agree = 0.0
    for lb, lc, b in zip(base, cand, ids.split(batch)):
        lpb, lpc = F.log_softmax(lb, -1), F.log_softmax(lc, -1)
        nll += F.nll_loss(lpc[:, :-1].flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
        kl += (lpb.exp() * (lpb - lpc)).sum().item()
        agree += (lb.argmax(-1) == lc.argmax(-1)).sum().item()
    n, n_next = ids.numel(), ids.shape[0] * (ids.shape[1] - 1)
    return float(torch.tensor(nll / n_next).exp()), kl / n, agree / n


compare_logits = _compare  # the one implementation of these figures (`verify` reports FP8 vs bf16 with it)


def _score(name: str, spec, base_logits, dec, ids, batch) -> Score:
    t0 = time.perf_counter()
    logits = _logits(dec, ids, batch)
    seconds = time.perf_counter() - t0
    ppl, kl, agree = _compare(base_logits, logits, ids, batch)
    return Score(name, spec.num_layers, non_empty_layers(spec), len(spec.attention_layers()),
                 len(spec.ffn_layers()), spec.sync_points_per_token(), parameter_count(spec),
                 ppl, kl, agree, ids.numel(), seconds)


def evaluate(base: str | Path, candidates: list[str | Path], text: str | Path, *, tokens: int = 4096,
             seq_len: int = 128, batch: int = 8, tokenizer: str | Path | None = None,
             progress: bool = True) -> list[Score]:
    """Scores for BASE (its own reference) and each candidate, on the same held-out token batches.

    Every candidate is opened and checked (config, weights on disk, vocabulary) before the base is
    scored, so a typo in the last path fails in a second, not after minutes of scoring.
    """
    from export.runtime.model import load_decoder
    from export.sources import open_source

    spec, dec = load_model(base)
    opened = []
    for path in candidates:
        cspec, _, weights = open_source(Path(path))
        if cspec.vocab != spec.vocab:
            raise ExportError(f"{path}: vocab {cspec.vocab} differs from the base's {spec.vocab}")
        opened.append((path, cspec, weights))
    tok = load_tokenizer(base, tokenizer, kind="tokenizers")
    ids = token_batch(text, tok, spec.vocab, tokens, seq_len)
    bar = item_progress(len(candidates) + 1, "evaluate", unit="model", enabled=progress)
    t0 = time.perf_counter()
    base_logits = _logits(dec, ids, batch)
    scores = [_score(Path(base).name, spec, base_logits, dec, ids, batch)]
    scores[0].seconds = time.perf_counter() - t0
    bar.update()
    del dec
    for path, cspec, weights in opened:
        cdec = load_decoder(weights(Mapping(), 0), dtype=torch.float32)
        scores.append(_score(Path(path).name, cspec, base_logits, cdec, ids, batch))
        del cdec
        bar.update()
    bar.close()
    return scores


def format_scores(scores: list[Score]) -> str:
    head = (f"{'model':<28} {'layers':>7} {'attn':>5} {'ffn':>5} {'syncs/tok':>9} {'params':>11} "
            f"{'ppl':>9} {'KL vs base':>11} {'top-1 agree':>11}")
    rows = [head, "-" * len(head)]
    for s in scores:
        rows.append(f"{s.name[:28]:<28} {s.non_empty_layers:>7} {s.attention_layers:>5} {s.ffn_layers:>5} "
                    f"{s.sync_points_per_token:>9} {s.parameters:>11,} {s.perplexity:>9.3f} {s.kl_vs_base:>11.2e} "
                    f"{s.top1_agreement:>11.2%}")
    rows.append(f"({scores[0].tokens} held-out tokens; layers = non-empty blocks)")
    return "\n".join(rows)

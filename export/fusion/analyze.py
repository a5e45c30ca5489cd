"""The paper's block-dependency matrix M, measured on calibration text.

h_j(X) = f_j(X) - X is block j's contribution to the residual stream; h~_j^i is the same block's
contribution when block i (< j) is removed from the model. M[i][j] = CosineDistance(h_j, h~_j^i)
= 1 - cos(h_j, h~_j^i), computed per token and **averaged over all calibration tokens** (every
position of every sequence, equally weighted; the paper does not state its aggregation). Small
M[i][j] means block j barely notices block i, so the two can run in parallel (be fused).

Cost: one full pass keeps the hidden state before every block; removing block i then restarts
from the stored state before block i, so only the suffix after i is rerun: m(m-1)/2 block calls
per batch instead of m^2. Empty blocks are identities and are skipped (their rows and columns
are null). Also recorded per block (paper section 5.5): |h(X)| / |X| and CosineDistance(X, f(X)).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from export.fusion.calib import load_model, token_batch
from export.fusion.heatmap import write_heatmap
from export.fusion.plan import FusionPlan, PlanOptions, propose_plan
from export.io.output import check_output, output_dir
from export.io.tokenizer import load_tokenizer
from export.progress import item_progress

AGGREGATION = ("per-token cosine distance 1 - cos(h_j, h~_j^i), averaged over every calibration token "
               "(all positions of all sequences, equal weight)")


@dataclass
class Dependency:
    matrix: list[list[float | None]]  # M[i][j] for i < j; None where undefined
    tokens: int
    seconds: float
    block_calls: int
    block_stats: list[dict[str, float | None]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"definition": "M[i][j] = CosineDistance(h_j(X), h_j(X) with block i removed), i < j; "
                              "h_j(X) = f_j(X) - X",
                "aggregation": AGGREGATION, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "block_calls": self.block_calls, "matrix": self.matrix, "block_stats": self.block_stats}


def _cos_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cos, in float64 so distances near 2^-12 are not rounding noise."""
    return 1 - F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30)


def _states(dec, ids: torch.Tensor) -> list[torch.Tensor]:
    """X_0 .. X_m: the hidden state before every block and after the last."""
    xs = [dec.embed(ids)]
    for j in range(dec.spec.num_layers):
        xs.append(dec.block(j, xs[-1]))
    return xs


@torch.inference_mode()
def dependency_matrix(dec, ids: torch.Tensor, batch: int = 8, progress: bool = True) -> Dependency:
    """M over the [N, T] calibration ids, `batch` sequences at a time (tp = 1 decoder)."""
    t0 = time.perf_counter()
    spec = dec.spec
    m = spec.num_layers
    active = [i for i in range(m) if not spec.layers[i].is_empty]
    sums = torch.zeros(m, m, dtype=torch.float64)
    rel, move = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    batches = list(ids.split(batch))
    bar = item_progress(len(batches) * len(active), "dependency", unit="removal", enabled=progress)
    calls = 0
    for b in batches:
        xs = _states(dec, b)
        calls += m
        for j in active:
            h = xs[j + 1] - xs[j]
            rel[j] += (h.double().norm(dim=-1) / xs[j].double().norm(dim=-1)).sum()
            move[j] += _cos_dist(xs[j], xs[j + 1]).sum()
        for i in active:
            y = xs[i]  # the state before block i: removing i means block i+1 sees it directly
            for j in (k for k in active if k > i):
                y_next = dec.block(j, y)
                sums[i, j] += _cos_dist(xs[j + 1] - xs[j], y_next - y).sum()
                y = y_next
                calls += 1
            bar.update()
    bar.close()
    n = ids.numel()
    matrix = [[float(sums[i, j] / n) if i < j and i in active and j in active else None for j in range(m)]
              for i in range(m)]
    stats = [{"rel_norm": float(rel[j] / n), "cos_dist_in_out": float(move[j] / n)} if j in active
             else {"rel_norm": None, "cos_dist_in_out": None} for j in range(m)]
    return Dependency(matrix, n, time.perf_counter() - t0, calls, stats)


@dataclass
class Analysis:
    out: Path
    dependency: Dependency
    plan: FusionPlan


def analyze_checkpoint(ckpt: str | Path, calib: str | Path, out: str | Path, *, tokens: int = 2048,
                       seq_len: int = 128, batch: int = 8, options: PlanOptions | None = None,
                       tokenizer: str | Path | None = None, progress: bool = True,
                       overwrite: bool = False) -> Analysis:
    """M on `tokens` calibration tokens, a proposed plan and the heatmap, written atomically to `out`.

    `out` is checked first (new, or a previous output with `overwrite`), not after the long pass."""
    inputs = [ckpt, calib, tokenizer]
    check_output(out, inputs=inputs, overwrite=overwrite)
    spec, dec = load_model(ckpt)
    tok = load_tokenizer(ckpt, tokenizer, kind="tokenizers")
    ids = token_batch(calib, tok, spec.vocab, tokens, seq_len)
    dep = dependency_matrix(dec, ids, batch, progress)
    plan = propose_plan(spec, options or PlanOptions(), dep.matrix)
    with output_dir(out, inputs=inputs, overwrite=overwrite) as tmp:
        (tmp / "dependency.json").write_text(json.dumps({"checkpoint": str(Path(ckpt).resolve()),
                                                        "calibration": str(calib), **dep.to_json()}) + "\n")
        plan.save(tmp / "plan.json")
        write_heatmap(tmp / "heatmap.png", spec, dep.matrix, plan.resolve(spec),
                      f"{Path(ckpt).name}: block dependency M on {dep.tokens} tokens "
                      f"(dashed: attention-free runs, red: proposed groups)")
    return Analysis(Path(out), dep, plan)

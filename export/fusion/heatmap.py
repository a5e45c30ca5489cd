"""A log-scale heatmap of the dependency matrix, like the paper's figure.

Rows are the removed block i, columns the affected block j (upper triangle). Attention-free runs
are outlined dashed black (the paper's dashed box), proposed fusion groups solid red.
"""

from __future__ import annotations

import math
from pathlib import Path

from export.deployment_plan import attention_free_runs
from export.fusion.plan import Group
from export.spec import ModelSpec


def _square(ax, first: int, last: int, **style) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((first - 0.5, first - 0.5), last - first + 1, last - first + 1, fill=False, **style))


def write_heatmap(path: str | Path, spec: ModelSpec, matrix: list[list[float | None]], groups: list[Group],
                  title: str = "") -> None:
    """PNG of log2 M with runs (dashed black) and proposed groups (solid red) marked; undefined cells white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    m = len(matrix)
    data = np.array([[v if v is not None and v > 0 else np.nan for v in row] for row in matrix], dtype=float)
    finite = data[np.isfinite(data)]
    lo = 2.0 ** math.floor(math.log2(finite.min())) if finite.size else 2.0 ** -9
    hi = 2.0 ** math.ceil(math.log2(finite.max())) if finite.size else 2.0 ** -1
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(data, cmap=cmap, norm=LogNorm(vmin=lo, vmax=max(hi, lo * 2)), interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = [2.0 ** k for k in range(int(math.log2(lo)), int(math.log2(max(hi, lo * 2))) + 1)]
    ticks = ticks[::-1][::2][::-1] if len(ticks) > 10 else ticks  # every other power when crowded
    bar.set_ticks(ticks, labels=[f"$2^{{{int(math.log2(t))}}}$" for t in ticks])
    bar.set_label("M[i][j] = cosine distance (log scale)")
    for run in attention_free_runs(spec):
        _square(ax, run[0], run[-1], edgecolor="black", linestyle="--", linewidth=1.5)
    for g in groups:
        _square(ax, g.first, g.last, edgecolor="red", linewidth=2)
    step = max(1, m // 20)
    ax.set_xticks(range(0, m, step))
    ax.set_yticks(range(0, m, step))
    ax.set_xlabel("block j (dependent)")
    ax.set_ylabel("block i (removed)")
    ax.set_title(title or "block dependency M (dashed: attention-free runs, red: proposed groups)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

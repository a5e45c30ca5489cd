"""Run the reference model one layer at a time, holding one layer's weights: calibration at any size.

Calibrating a model means running a few thousand tokens through it, which needs every layer once,
never all layers at the same time. This runner keeps the calibration batches' hidden states (2048
tokens of Ultra's 16384-wide hidden state in fp32: 128 MiB) and loads a layer's weights, runs every
batch through it, and frees them before the next layer, as ModelOpt's and llm-compressor's
sequential calibration do. Peak memory is then the largest layer plus the activations instead of
the whole model in fp32 (about 1 TB for Ultra). The arithmetic is the `Decoder`'s own (`block`),
so what `observe` sees is exactly what the whole-model run would show.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from export import rope
from export.layout import rank_pieces
from export.progress import item_progress
from export.rank_weights import RankWeights
from export.runtime.model import Decoder, load_pieces
from export.tensors import Role


@torch.inference_mode()
def run_layerwise(weights: RankWeights, batches: list[torch.Tensor], *, dtype: torch.dtype = torch.float32,
                  observe: Callable[[object, torch.Tensor], None] | None = None, head: bool = False,
                  progress: bool = True, label: str = "layers") -> list[torch.Tensor]:
    """The [B, T] id `batches` through the whole model (tp = pp = 1), one layer resident at a time;
    `observe` is installed as `Decoder.observe`. Returns each batch's final hidden states, or its
    fp32 logits with `head` (which also lets `observe` see the lm_head's input)."""
    spec = weights.spec
    assert weights.mapping.world_size == 1, "a layer-at-a-time run is one process (tp = pp = 1)"
    with torch.device("meta"):
        dec = Decoder(spec, weights.mapping, weights.rank, dtype)
    dec.inv_freq, dec.observe = rope.inv_freq(spec), observe
    pieces = rank_pieces(spec, weights.mapping, weights.rank)
    groups: list[list] = [[p for p in pieces if p.ref.layer is None and p.ref.role is Role.EMBED]]
    groups += [[p for p in pieces if p.ref.layer == i] for i in range(spec.num_layers)]
    groups.append([p for p in pieces if p.ref.layer is None and p.ref.role is not Role.EMBED] if head else [])
    bar = item_progress(len(groups), label, unit="layer", enabled=progress)
    hidden: list[torch.Tensor] = []
    for g, group in enumerate(groups):
        load_pieces(dec, weights, group)
        if g == 0:
            hidden = [dec.embed(b) for b in batches]
        elif g <= spec.num_layers:
            hidden = [dec.block(g - 1, h) for h in hidden]
        elif group:
            hidden = [dec.head(h) for h in hidden]
        _release(dec, group)
        bar.update()
    bar.close()
    return hidden


def _release(dec: Decoder, group: list) -> None:
    """Put the group's parameters back on the meta device: their memory is freed."""
    for p in group:
        dec._store(p.ref.role, p.ref.layer, torch.empty(p.shape, device="meta"), p.ref.branch)

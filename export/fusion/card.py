"""The fused checkpoint's own model card: what it was made from and how, not the source's claims.

Copying the source's README.md through would describe the wrong model (the demo's says
`attention_removed: 3,4,5,6` and quotes the source's perplexity). The source card is kept beside
it as `README.source.md`.
"""

from __future__ import annotations

from pathlib import Path

from export.card import table, write_card
from export.fusion.plan import Group
from export.spec import ModelSpec
from export.tensors import parameter_count

SOURCE_CARD = "README.source.md"


def write_fused_card(out: Path, source: Path, before: ModelSpec, after: ModelSpec, groups: list[Group],
                     norm: str, fp8_note: str | None = None) -> None:
    """README.md in `out` (the source's card, if any, moved to README.source.md first); `fp8_note`
    says how an FP8 source's fused tensors were requantized."""
    if (out / "README.md").is_file():
        (out / "README.md").rename(out / SOURCE_CARD)
    facts = {
        "fused_from": source.resolve().name, "fusion_groups": ",".join(f"{g.first}-{g.last}" for g in groups),
        "fused_widths": ",".join(str(g.fused_width) for g in groups), "norm": norm, "dtype": after.dtype,
        "layers_before": before.num_layers, "layers_after": after.num_layers,
        "sync_points_per_token_before": before.sync_points_per_token(),
        "sync_points_per_token_after": after.sync_points_per_token(),
        "parameters_before": parameter_count(before), "parameters_after": parameter_count(after),
    }
    if not after.quant.is_none:
        facts["quantization"] = after.quant.describe()
    quant = (f"\nQuantization: {after.quant.describe()} (ModelOpt format, `hf_quant_config.json`). {fp8_note}\n"
             if fp8_note else "")
    rows = [(f"group {g.label}", f"FFNs of layers {list(g.ffn_layers)}, widths {list(g.widths)} -> one FFN of "
             f"width {g.fused_width}") for g in groups]
    body = f"""
An FFN-Fused ([arXiv 2503.18908](https://arxiv.org/abs/2503.18908)) checkpoint written by
`python -m export fuse` from `{source.resolve()}`. Each group of consecutive attention-free FFNs
became one wide FFN on a shared input (gate/up stacked, down concatenated): the group now runs in
parallel, where the source ran it in sequence, so its outputs differ from the source's by the
dependency the fusion removed.

{table(rows)}

| | source | fused |
|---|---|---|
| blocks | {before.num_layers} | {after.num_layers} |
| sync points per token (tp > 1) | {before.sync_points_per_token()} | {after.sync_points_per_token()} |
| parameters | {parameter_count(before):,} | {parameter_count(after):,} |

Norms: `{norm}`. {NORM_NOTES[norm]}
{quant}
Quality is not measured by `fuse`: `python -m export evaluate {source} THIS_DIR --text HELDOUT`
gives perplexity, KL and top-1 agreement against the source. What the source's card says
(`{SOURCE_CARD}`, when it had one) is about the source, not about this model. The exact plan and
the old -> new layer map: `fusion_plan.json`.
"""
    write_card(out, facts, f"FFN-Fused {source.resolve().name}", body)


NORM_NOTES = {
    "fold": "each member's RMSNorm scale was multiplied into its gate and up rows and the fused block "
            "has a unit-scale norm. In exact arithmetic that is the parallel form exactly; stored in "
            "bfloat16 or float16, each folded product is rounded once (about 8e-4 relative (L2) on the demo "
            "model's FFN output in bfloat16). `fuse --dtype float32` keeps them unrounded.",
    "last": "the last member's norm serves the whole group (the paper's eq. 5); weights are copied unchanged.",
    "per branch (parallel-blocks)": "each group is one Puzzletron `parallel_blocks` layer whose branches are "
            "the members' FFN blocks with their own norms and weights, copied unchanged: the parallel "
            "form exactly, in any dtype.",
}

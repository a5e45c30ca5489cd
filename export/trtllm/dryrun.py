"""`convert --dry-run`: every rank file's tensors, shapes and bytes, from config.json alone."""

from __future__ import annotations

from typing import Any

from export.deployment_plan import human_bytes
from export.layout import SCALE_BYTES, rank_bytes, rank_scales, require_layout
from export.mapping import Mapping
from export.quantization import FP8_DTYPE
from export.spec import DTYPE_BYTES, TRTLLM_STAGE, ModelSpec, normalize_dtype
from export.trtllm.config import trtllm_config
from export.trtllm.rank_layout import check_complete, plan_checkpoint, quant_layout_problems


def dry_run(spec: ModelSpec, mapping: Mapping, dtype: str | None = None) -> dict[str, Any]:
    """The plan the converter would write, with per-rank totals cross-checked against `inspect`'s."""
    dtype = normalize_dtype(dtype or spec.dtype)
    spec.refuse_unsupported(TRTLLM_STAGE, ffn_only_parallel_ok=True)
    spec = spec.widened()  # as `convert` writes it: an attention-free parallel_blocks layer as one wide FFN
    require_layout(spec, mapping, trtllm=True)  # a TRT-LLM checkpoint: stages trtllm-build can build
    plans = plan_checkpoint(spec, mapping)
    problems = check_complete(spec, mapping, plans) + quant_layout_problems(spec, mapping)
    sizes = {FP8_DTYPE: 1, **DTYPE_BYTES}
    ranks = []
    for plan in plans:
        tensors = [{"name": n, "shape": list(s), "dtype": plan.dtype_of(n, dtype),
                    "bytes": _numel(s) * sizes[plan.dtype_of(n, dtype)]} for n, s in plan.tensors.items()]
        scales = sum(t["bytes"] for t in tensors if t["name"] in plan.scales)
        # `inspect` counts ModelOpt's scales (q, k and v a pair each); the rank file has TRT-LLM's
        # (one pair for the qkv): the weights are compared, each side with its own scales
        hf_scales = SCALE_BYTES * len(rank_scales(spec, mapping, plan.rank))
        ranks.append({"rank": plan.rank, "tp_rank": mapping.tp_rank(plan.rank), "pp_rank": mapping.pp_rank(plan.rank),
                      "file": f"rank{plan.rank}.safetensors", "tensors": tensors, "bytes": plan.nbytes(dtype),
                      "scale_bytes": scales,
                      "inspect_bytes": rank_bytes(spec, mapping, plan.rank, dtype) - hf_scales + scales})
    whole = Mapping(mapping.tp, mapping.pp)  # the embedding on every tp rank, TRT-LLM's default
    saved = max(rank_bytes(spec, whole, r, dtype) for r in whole.ranks()) - max(r["bytes"] for r in ranks)
    return {"tp": mapping.tp, "pp": mapping.pp, "dtype": dtype, "problems": problems,
            "parallel_embedding": mapping.parallel_embedding, "embedding_sharding_dim": mapping.embedding_shard,
            "rank_bytes_saved": saved,
            "config": trtllm_config(spec, mapping, dtype), "ranks": ranks,
            "total_bytes": sum(r["bytes"] for r in ranks)}


def format_dry_run(rep: dict[str, Any], tensors: bool = True) -> str:
    lines = []
    for r in rep["ranks"]:
        lines.append(f"{r['file']} (tp_rank {r['tp_rank']}, pp_rank {r['pp_rank']}): {len(r['tensors'])} tensors, "
                     f"{r['bytes']:,} bytes ({human_bytes(r['bytes'])})")
        if tensors:
            lines += [f"  {t['name']:<52} {t['shape']!s:<18} {t['bytes']:>15,}" for t in r["tensors"]]
    ok = all(r["bytes"] == r["inspect_bytes"] for r in rep["ranks"]) and not rep["problems"]
    lines.append(f"total {rep['total_bytes']:,} bytes ({human_bytes(rep['total_bytes'])}, {rep['dtype']}) over "
                 f"{len(rep['ranks'])} ranks at tp={rep['tp']} pp={rep['pp']}; every split divides; per-rank bytes "
                 + ("match `inspect`" if ok else "DO NOT match `inspect`: " + "; ".join(rep["problems"])))
    if rep.get("parallel_embedding"):
        lines.append(f"parallel embedding (sharding dim {rep['embedding_sharding_dim']}): the largest rank file is "
                     f"{rep['rank_bytes_saved']:,} bytes ({human_bytes(rep['rank_bytes_saved'])}) smaller than with "
                     "the whole embedding on every tp rank; one more collective per forward pass")
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

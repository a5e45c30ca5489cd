"""`inspect`: plan a deployment from config.json alone, before any weight is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from export.errors import ConfigError
from export.layout import check_layout, check_trtllm_stages, layer_span, rank_bytes, rank_kv_bytes_per_token
from export.mapping import Mapping
from export.quantization import FP8, fp8_recipe
from export.spec import CPU_RUNS, CPU_STAGE, TRTLLM_STAGE, AttentionKind, FFNKind, ModelSpec, normalize_dtype
from export.tensors import parameter_count


def planned(spec: ModelSpec, dtype: str | None = None, kv_cache_dtype: str | None = None) -> ModelSpec:
    """The description `inspect --dtype D --kv-cache-dtype K` plans. `fp8` weights: the linears
    quantized as ModelOpt's FP8 recipe does (lm_head excluded; an FP8 config keeps its own
    exclude_modules), the rest in the config's dtype; bf16 / fp16 / fp32: every tensor in it,
    unquantized. The KV cache is FP8 (1 byte a value) or the weights' dtype; left out, each keeps
    what the config says."""
    quant = spec.quant
    if dtype is not None and dtype.lower() == "fp8":
        quant = fp8_recipe(True, quant.fp8_kv, quant.exclude if quant.fp8 else fp8_recipe().exclude)
    elif dtype is not None:
        spec, quant = spec.with_dtype(normalize_dtype(dtype)), fp8_recipe(False, quant.fp8_kv)
    if kv_cache_dtype is not None:
        fp8_kv = kv_cache_dtype.lower() == "fp8"
        if not fp8_kv and normalize_dtype(kv_cache_dtype) != spec.dtype:
            raise ConfigError(f"--kv-cache-dtype {kv_cache_dtype}: the KV cache is fp8 or the weights' dtype "
                              f"({spec.dtype}), as TensorRT-LLM's kv_cache_dtype")
        quant = fp8_recipe(quant.fp8, fp8_kv, quant.exclude)
    return spec.with_quant(quant)


def kv_cache_dtype(spec: ModelSpec) -> str:
    return "float8_e4m3fn" if spec.quant.fp8_kv else spec.dtype


@dataclass(frozen=True)
class LayerRun:
    """Consecutive layers with identical structure, shown as one table row."""

    first: int
    last: int
    label: str

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def layer_runs(spec: ModelSpec) -> list[LayerRun]:
    runs: list[LayerRun] = []
    for i, lay in enumerate(spec.layers):
        label = lay.short()
        if runs and runs[-1].label == label:
            runs[-1] = LayerRun(runs[-1].first, i, label)
        else:
            runs.append(LayerRun(i, i, label))
    return runs


def attention_free_runs(spec: ModelSpec) -> list[list[int]]:
    """Maximal runs of consecutive FFN-only blocks (empty blocks in between are skipped over):
    the candidates for FFN Fusion."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i, lay in enumerate(spec.layers):
        if lay.is_empty:
            continue
        if not lay.has_attention and lay.ffn.kind is FFNKind.SWIGLU:
            current.append(i)
        else:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def wide_ffns(spec: ModelSpec) -> list[tuple[int, int]]:
    """Attention-free FFNs wider than any FFN in an attention block: what fusion produces."""
    attn_widths = [lay.ffn.width for lay in spec.layers
                   if lay.has_attention and lay.ffn.width is not None]
    limit = max(attn_widths, default=0)
    return [(i, lay.ffn.width) for i, lay in enumerate(spec.layers)
            if not lay.has_attention and lay.ffn.width is not None and lay.ffn.width > limit]


def stage_report(spec: ModelSpec, mapping: Mapping, dtype: str) -> list[dict[str, Any]]:
    """Per pipeline stage: its layers (TRT-LLM's split), weight bytes and KV-cache bytes per token,
    so an unbalanced heterogeneous model shows before anything is converted."""
    attention = set(spec.attention_layers())
    out = []
    for s, layers in enumerate(mapping.stages(spec.num_layers)):
        ranks = mapping.stage_ranks(s)
        weights = [rank_bytes(spec, mapping, r, dtype) for r in ranks]
        kv = [rank_kv_bytes_per_token(spec, mapping, r, dtype) for r in ranks]
        out.append({"stage": s, "first": layers.start, "last": layers.stop - 1, "layers": len(layers),
                    "attention_layers": len(attention.intersection(layers)),
                    "weight_bytes": sum(weights), "rank_weight_bytes": max(weights),
                    "kv_cache_bytes_per_token": sum(kv), "rank_kv_cache_bytes_per_token": max(kv)})
    return out


def plan_report(spec: ModelSpec, mapping: Mapping, dtype: str | None = None) -> dict[str, Any]:
    """Every figure `inspect` prints; the weights at their stored dtypes (`layout.rank_bytes`:
    FP8 linears at 1 byte plus their scales when `spec.quant` says FP8), the KV cache at
    `kv_cache_dtype`."""
    spec = spec.with_dtype(dtype) if dtype else spec
    dtype = spec.dtype
    problems = check_layout(spec, mapping) + spec.unsupported(CPU_STAGE, **CPU_RUNS)
    trtllm = check_trtllm_stages(spec, mapping) + spec.unsupported(TRTLLM_STAGE, ffn_only_parallel_ok=True)
    per_rank = ([rank_bytes(spec, mapping, r, dtype) for r in mapping.ranks()] if not problems
                else None)
    split = Mapping(mapping.tp, mapping.pp, embedding_shard=0)  # what --parallel-embedding would hold
    per_rank_split = ([rank_bytes(spec, split, r, dtype) for r in split.ranks()]
                      if not problems and mapping.tp > 1 and mapping.embedding_shard is None else None)
    return {
        "architecture": spec.architecture,
        "hidden_size": spec.hidden, "num_attention_heads": spec.heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab, "dtype": dtype,
        "quantization": spec.quant.describe(), "quant_algo": spec.quant.algo,
        "kv_cache_quant_algo": spec.quant.kv_cache, "kv_cache_dtype": kv_cache_dtype(spec),
        "layers": spec.num_layers,
        "attention_layers": len(spec.attention_layers()),
        "linear_attention_layers": sum(lay.attention.kind is AttentionKind.LINEAR for lay in spec.layers),
        "ffn_layers": len(spec.ffn_layers()),
        "linear_ffn_layers": sum(lay.ffn.kind is FFNKind.LINEAR for lay in spec.layers),
        "empty_layers": len(spec.empty_layers()),
        "parameters": parameter_count(spec),
        "kv_cache_bytes_per_token": rank_kv_bytes_per_token(spec, Mapping(1, 1), 0),  # the whole model's
        "sync_points_per_token": spec.sync_points_per_token(),
        "attention_free_runs": [[r[0], r[-1], len(r)] for r in attention_free_runs(spec)],
        "wide_ffns": [{"layer": i, "width": w} for i, w in wide_ffns(spec)],
        # Puzzletron parallel_blocks layers: one layer (its sync points), however many branches
        "parallel_layers": [{"layer": i, "branches": [b.short() for b in spec.layers[i].branches],
                             "sync_points": spec.layers[i].sync_points()} for i in spec.parallel_layers()],
        "block_schema": spec.block_schema.name,
        "tp": mapping.tp, "pp": mapping.pp,
        # layout_ok: what `convert` (a TRT-LLM checkpoint) accepts; targets.cpu: what the cpu engine runs
        "layout_ok": not problems and not trtllm, "layout_problems": problems + trtllm,
        "targets": {"cpu": {"ok": not problems, "problems": problems},
                    "trtllm": {"ok": not problems and not trtllm, "problems": problems + trtllm}},
        "rank_weight_bytes": per_rank,
        "rank_weight_bytes_parallel_embedding": per_rank_split,
        "rank_kv_cache_bytes_per_token": ([rank_kv_bytes_per_token(spec, mapping, r) for r in mapping.ranks()]
                                          if not problems else None),
        "stages": stage_report(spec, mapping, dtype) if not problems else None,
        "layer_runs": [{"first": r.first, "last": r.last, "layer": r.label} for r in layer_runs(spec)],
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def format_report(rep: dict[str, Any]) -> str:
    lines = ["layers     count  structure (A<kv>=attention, L=linear, -=no-op, F<width>=SwiGLU FFN"
             + (", M<width>=plain MLP, P[...]=parallel blocks)" if any(
                 "M" in r["layer"] or "P[" in r["layer"] for r in rep["layer_runs"]) else ")")]
    for r in rep["layer_runs"]:
        span = f"{r['first']}" if r["first"] == r["last"] else f"{r['first']}-{r['last']}"
        lines.append(f"{span:<10} {r['last'] - r['first'] + 1:>5}  {r['layer']}")
    lines.append("")
    p = rep["parameters"]
    lines += [
        f"architecture             {rep['architecture']}  hidden {rep['hidden_size']}, "
        f"{rep['num_attention_heads']} heads x {rep['head_dim']}, vocab {rep['vocab_size']}",
        f"parameters               {p:,} ({p / 1e9:.1f}B)",
        f"layers                   {rep['layers']}: {rep['attention_layers']} attention, "
        f"{rep['ffn_layers']} FFN, {rep['empty_layers']} empty"
        + (f", {rep['linear_attention_layers']} linear attention" if rep["linear_attention_layers"] else "")
        + (f", {rep['linear_ffn_layers']} linear FFN" if rep["linear_ffn_layers"] else ""),
        f"quantization             {rep['quantization']}" + (
            f" (weights: linears float8_e4m3fn + float32 per-tensor scales, the rest {rep['dtype']})"
            if rep["quant_algo"] == FP8 else ""),
        f"KV cache per token       {human_bytes(rep['kv_cache_bytes_per_token'])} ({rep['kv_cache_dtype']})",
        f"sync points per token    {rep['sync_points_per_token']} (at tp > 1: an all-reduce per attention and per FFN, "
        "+ the lm_head all-gather; none at tp 1)",
    ]
    runs = ", ".join(f"{a}-{b} ({n})" for a, b, n in rep["attention_free_runs"]) or "none"
    lines.append(f"attention-free FFN runs  {runs}")
    for par in rep.get("parallel_layers", []):
        lines.append(f"parallel blocks          layer {par['layer']}: {len(par['branches'])} branches "
                     f"({' + '.join(par['branches'])}) on one input, summed: {par['sync_points']} sync point(s)")
    if rep["wide_ffns"]:
        wide = ", ".join(f"layer {w['layer']}: {w['width']}" for w in rep["wide_ffns"])
        lines.append(f"fused (wide) FFNs        {wide}")
    lines.append(f"layout                   tp={rep['tp']} pp={rep['pp']}")
    cpu, trt = rep["targets"]["cpu"], rep["targets"]["trtllm"]
    if not cpu["ok"]:
        lines.append("divisibility             FAILS:")
        lines += [f"  - {p}" for p in cpu["problems"]]
        return "\n".join(lines)
    sizes = rep["rank_weight_bytes"]
    lines.append(f"per-rank weights         {human_bytes(max(sizes))} max, "
                 f"{human_bytes(sum(sizes))} total ({_weights_dtype(rep)})")
    if rep.get("rank_weight_bytes_parallel_embedding"):
        split = rep["rank_weight_bytes_parallel_embedding"]
        lines.append(f"  --parallel-embedding   {human_bytes(max(split))} max per rank: saves "
                     f"{human_bytes(max(sizes) - max(split))} on each rank holding the embedding "
                     "(one more collective per forward pass, at the lookup)")
    kv = rep["rank_kv_cache_bytes_per_token"]
    lines.append(f"per-rank KV cache        {human_bytes(max(kv))} per token max ({rep['kv_cache_dtype']})")
    lines.append("divisibility             ok: tp divides heads, kv heads and every FFN width")
    if trt["ok"]:
        lines.append("trtllm-build             ok: every pipeline stage has a full-attention layer")
    else:
        lines.append("trtllm-build             FAILS (convert refuses; the cpu engine, verify/generate, runs it):")
        lines += [f"  - {p}" for p in trt["problems"]]
    if rep["pp"] > 1:
        lines += format_stages(rep)
    return "\n".join(lines)


def _weights_dtype(rep: dict[str, Any]) -> str:
    return f"fp8 linears, {rep['dtype']} rest" if rep["quant_algo"] == FP8 else rep["dtype"]


def format_stages(rep: dict[str, Any]) -> list[str]:
    stages, n, pp = rep["stages"], rep["layers"], rep["pp"]
    split = (f"{n // pp} layers each" if n % pp == 0
             else f"uneven, TRT-LLM's split: the first {n % pp} get {n // pp + 1} layers, the rest {n // pp}")
    lines = ["", f"pipeline stages          {pp} ({split}); per tp rank of each stage:",
             "stage  layers        count  attention  weights/rank  KV cache/token/rank"]
    for st in stages:
        span = layer_span(range(st["first"], st["last"] + 1)).split(" ", 1)[1]
        note = "" if st["attention_layers"] else "  no full attention: trtllm-build cannot build it"
        weights, kv = human_bytes(st["rank_weight_bytes"]), human_bytes(st["rank_kv_cache_bytes_per_token"])
        lines.append(f"{st['stage']:<6} {span:<13} {st['layers']:>5}  {st['attention_layers']:>9}  "
                     f"{weights:>12}  {kv:>19}{note}")
    w = [st["rank_weight_bytes"] for st in stages]
    kv = [st["rank_kv_cache_bytes_per_token"] for st in stages]
    lines.append(f"stage balance            weights max/min {max(w) / min(w):.2f}x"
                 + (f", KV cache max/min {max(kv) / min(kv):.2f}x" if min(kv) else ", KV cache: a stage holds none"))
    return lines

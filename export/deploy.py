"""`plan-deployment`: which layouts of a model run on N GPUs of a kind, ranked, from config.json alone.

Users of these models size deployments by hand and get it wrong (vLLM #16318: Ultra on
16xA100-40GB, "No available memory for the cache blocks"; TensorRT-LLM PR #8399 capping Ultra's
max_seq_len and batch to avoid OOM). Every figure here comes from the same layout functions the
converter, `inspect` and the runtime use (`rank_bytes`, `rank_kv_bytes_per_token`,
`check_layout`, `check_trtllm_stages`), so the plan cannot disagree with the rank files.

Memory model, per GPU (each rank is one GPU):
    KV cache bytes = kv_fraction * (GPU memory - rank weights - reserve)
    KV tokens      = KV cache bytes // the rank's KV bytes per token
and a layout holds the least any of its ranks holds (every stage caches every token of its
layers). `reserve` stands for the CUDA context, NCCL and cuBLAS workspaces and the activation
buffers (a stated assumption, `--reserve-gib`); `kv_fraction` is TRT-LLM's
`kv_cache_free_gpu_mem_fraction` default 0.9 (`--kv-fraction`). Paged-block rounding (under one
block per sequence) is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from export.deployment_plan import human_bytes
from export.errors import ExportError
from export.layout import check_layout, check_trtllm_stages, rank_bytes, rank_kv_bytes_per_token, sync_points_per_token
from export.mapping import Mapping
from export.quantization import Quantization, fp8_recipe
from export.spec import ModelSpec

GiB = 1 << 30
DEFAULT_RESERVE = 4 * GiB
DEFAULT_KV_FRACTION = 0.9  # TRT-LLM KvCacheConfig.free_gpu_memory_fraction / trtllm-serve's default


@dataclass(frozen=True)
class GPU:
    """A GPU kind: its memory (the capacity in its name, decimal GB: at or below what nvidia-smi
    reports for these SKUs, so the plan errs on the safe side) and whether it has FP8 tensor cores
    (Ada / Hopper / Blackwell; TRT-LLM's FP8 GEMMs need sm89+, which the A100 is not)."""

    name: str
    memory: int
    fp8: bool


GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("H100 80GB", 80 * 10**9, True),
    "h200-141gb": GPU("H200 141GB", 141 * 10**9, True),
    "b200-192gb": GPU("B200 192GB", 192 * 10**9, True),
    "a100-80gb": GPU("A100 80GB", 80 * 10**9, False),
    "a100-40gb": GPU("A100 40GB", 40 * 10**9, False),
    "l40s-48gb": GPU("L40S 48GB", 48 * 10**9, True),
}


def parse_gpu(text: str, fp8: bool | None = None) -> GPU:
    """A known kind (`h100-80gb`) or a memory size (`80GB`, `75GiB`, bytes); a bare size is
    assumed FP8-capable unless `fp8` says otherwise."""
    key = text.strip().lower()
    if key in GPUS:
        gpu = GPUS[key]
        return gpu if fp8 is None else GPU(gpu.name, gpu.memory, fp8 and gpu.fp8)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(gib|gb|mib|mb|b)?", key)
    if not m:
        raise ExportError(f"--gpu {text!r}: not one of {', '.join(GPUS)} nor a memory size like 80GB or 75GiB")
    scale = {"gib": GiB, "gb": 10**9, "mib": 1 << 20, "mb": 10**6, "b": 1, None: 1}[m.group(2)]
    memory = int(float(m.group(1)) * scale)
    if memory < GiB:
        raise ExportError(f"--gpu {text!r}: {memory:,} bytes is less than 1 GiB (say GB or GiB)")
    return GPU(f"{human_bytes(memory)} GPU", memory, True if fp8 is None else fp8)


@dataclass(frozen=True)
class Option:
    """One candidate: a layout and the precisions of its weights and KV cache."""

    mapping: Mapping
    fp8_weights: bool
    fp8_kv: bool

    @property
    def quantization(self) -> Quantization:
        return fp8_recipe(self.fp8_weights, self.fp8_kv)

    @property
    def label(self) -> str:
        emb = "vocab-split" if self.mapping.parallel_embedding else "whole"
        return (f"tp{self.mapping.tp} pp{self.mapping.pp} weights {'fp8' if self.fp8_weights else 'bf16'} "
                f"kv {'fp8' if self.fp8_kv else 'bf16'} embedding {emb}")


def candidates(spec: ModelSpec, gpus: int, gpus_per_node: int, fp8: bool) -> list[Option]:
    """Every layout TRT-LLM can build within the GPUs: tp inside a node (TP's per-layer collectives
    want NVLink), any pp over the rest whose stages each hold a full-attention layer."""
    out = []
    for tp in range(1, gpus_per_node + 1):
        if check_layout(spec, Mapping(tp)):
            continue
        for pp in range(1, gpus // tp + 1):
            if check_layout(spec, Mapping(tp, pp)) or check_trtllm_stages(spec, Mapping(tp, pp)):
                continue
            for emb in ((None, 0) if tp > 1 else (None,)):
                for fw in ((False, True) if fp8 else (False,)):
                    for fk in ((False, True) if fp8 else (False,)):
                        out.append(Option(Mapping(tp, pp, embedding_shard=emb), fw, fk))
    return out


def evaluate(spec: ModelSpec, opt: Option, gpu: GPU, *, seq_len: int, batch: int,
             reserve: int, kv_fraction: float, total_gpus: int) -> dict[str, Any]:
    """One option's figures: per-rank weights, free bytes, KV tokens, sequences at `seq_len`, and
    how many copies (data-parallel replicas) of the layout the GPUs hold."""
    m, spec = opt.mapping, spec.with_dtype("bfloat16").with_quant(opt.quantization)
    weights = [rank_bytes(spec, m, r) for r in m.ranks()]
    kv = [rank_kv_bytes_per_token(spec, m, r) for r in m.ranks()]
    free = [gpu.memory - w - reserve for w in weights]
    # every rank caches every token for its own layers: the layout holds what its tightest rank holds
    tokens = min((max(int(kv_fraction * f), 0) // k for f, k in zip(free, kv, strict=True) if k), default=0)
    worst = max(m.ranks(), key=lambda r: weights[r])
    seqs = tokens // seq_len
    replicas = total_gpus // m.world_size
    row: dict[str, Any] = {
        "label": opt.label, "tp": m.tp, "pp": m.pp, "gpus": m.world_size, "replicas": replicas,
        "weights": "fp8" if opt.fp8_weights else "bf16", "kv_cache": "fp8" if opt.fp8_kv else "bf16",
        "parallel_embedding": m.parallel_embedding,
        "rank_weight_bytes": weights[worst], "rank_weight_bytes_all": weights,
        "rank_free_bytes": min(free), "rank_kv_bytes_per_token": max(kv),
        "kv_tokens_per_rank": tokens, "max_sequences": seqs, "total_sequences": seqs * replicas,
        "sync_points_per_token": sync_points_per_token(spec, m),
    }
    if min(free) <= 0:
        row.update(fits=False, meets_batch=False, shortfall_bytes=-min(free),
                   why=f"weights {human_bytes(weights[worst])} + reserve {human_bytes(reserve)} exceed the "
                       f"{human_bytes(gpu.memory)} GPU by {human_bytes(-min(free))}")
    elif seqs < 1:
        short = max(seq_len * k / kv_fraction - f for f, k in zip(free, kv, strict=True))
        row.update(fits=False, meets_batch=False, shortfall_bytes=max(1, int(short)),
                   why=f"room for {tokens:,} KV tokens per rank: not one sequence of {seq_len}")
    else:
        row.update(fits=True, meets_batch=seqs * replicas >= batch, shortfall_bytes=0, why="")
    return row


def rank_key(row: dict[str, Any]) -> tuple:
    """Fits, then serves --batch sequences of --seq-len (over all replicas), then fewest pipeline
    stages (each adds a hand-off per token, and in-flight batching needs pp micro-batches to keep
    them busy), then the most concurrent sequences on all the GPUs, then the fewest sync points.
    Layouts that do not fit come last, the smallest shortfall first."""
    if not row["fits"]:
        return (1, 0, row["shortfall_bytes"], row["pp"], 0, 0)
    return (0, not row["meets_batch"], row["pp"], -row["total_sequences"], row["sync_points_per_token"], 0)


def plan_deployment(spec: ModelSpec, gpu: GPU, *, gpus: int, nodes: int = 1, seq_len: int, batch: int = 1,
                    reserve: int = DEFAULT_RESERVE, kv_fraction: float = DEFAULT_KV_FRACTION) -> dict[str, Any]:
    """Every option ranked (`rank_key`), with the assumptions that produced the figures."""
    problems = [msg for ok, msg in ((gpus >= 1, f"--gpus must be >= 1, got {gpus}"),
                                    (nodes >= 1, f"--nodes must be >= 1, got {nodes}"),
                                    (seq_len >= 1, f"--seq-len must be >= 1, got {seq_len}"),
                                    (batch >= 1, f"--batch must be >= 1, got {batch}"),
                                    (reserve >= 0, "--reserve-gib must be >= 0"),
                                    (0 < kv_fraction <= 1, f"--kv-fraction must be in (0, 1], got {kv_fraction}"))
                if not ok]
    if problems:
        raise ExportError("; ".join(problems))
    total = gpus * nodes
    rows = [evaluate(spec, o, gpu, seq_len=seq_len, batch=batch, reserve=reserve, kv_fraction=kv_fraction,
                     total_gpus=total) for o in candidates(spec, total, gpus, gpu.fp8)]
    rows.sort(key=rank_key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    bf16 = next((r for r in rows if r["fits"] and r["weights"] == r["kv_cache"] == "bf16"), None)
    return {"gpu": gpu.name, "gpu_memory_bytes": gpu.memory, "gpu_fp8": gpu.fp8, "gpus_per_node": gpus,
            "nodes": nodes, "seq_len": seq_len, "batch": batch, "reserve_bytes": reserve, "kv_fraction": kv_fraction,
            "assumptions": assumptions(gpu, reserve, kv_fraction),
            "options": rows, "chosen": rows[0] if rows and rows[0]["fits"] else None,
            "best_bf16": bf16, "fits": bool(rows) and rows[0]["fits"]}


def assumptions(gpu: GPU, reserve: int, kv_fraction: float) -> list[str]:
    return [
        f"GPU memory {human_bytes(gpu.memory)} ({gpu.name}; the capacity in its name, in decimal GB; "
        "pass MEM, e.g. --gpu 79.6GiB, for what nvidia-smi reports)",
        f"reserve {human_bytes(reserve)} per GPU for the CUDA context, NCCL/cuBLAS workspaces and activation "
        "buffers (--reserve-gib; raise it for large max_num_tokens)",
        f"KV cache gets {kv_fraction:g} of what is left (TRT-LLM's kv_cache_free_gpu_mem_fraction default; "
        "--kv-fraction)",
        "fp8 weights: the linear layers at 1 byte per weight as ModelOpt's FP8 recipe quantizes them; the "
        "embedding, norms and lm_head stay bf16 (lm_head in exclude_modules); each linear's two float32 "
        "per-tensor scales counted (export.layout.rank_bytes, the rule inspect uses)",
        "fp8 KV cache: 1 byte per value (kv_cache_quant_algo FP8); only full-attention layers cache anything",
        "tp stays inside a node; pp only at splits trtllm-build can build (a full-attention layer per stage)",
    ]


def commands(rep: dict[str, Any], row: dict[str, Any], source: str = "SRC", name: str = "NAME") -> list[str]:
    """The exact commands for one option. FP8 checkpoints are not written by this exporter: they
    come from ModelOpt (TensorRT-LLM's examples/quantization/quantize.py) or a later `quantize`."""
    tp, pp, seq = row["tp"], row["pp"], rep["seq_len"]
    batch = max(1, min(row["max_sequences"], 2048))
    pe = " --parallel-embedding" if row["parallel_embedding"] else ""
    serve = (f"trtllm-serve engines/{name}/trtllm --backend tensorrt --tokenizer engines/{name}/tokenizer "
             f"--tp_size {tp} --pp_size {pp} --max_batch_size {batch} --max_seq_len {seq} "
             f"--kv_cache_free_gpu_memory_fraction {rep['kv_fraction']:g}")
    if row["weights"] == row["kv_cache"] == "bf16":
        return [f"python -m export convert {source} --tp {tp} --pp {pp} --dtype bf16{pe} --out engines/{name}",
                f"python -m export build engines/{name} --max-seq-len {seq} --max-batch-size {batch}",
                f"python -m export package engines/{name} --out repo/{name} --backend trtllm "
                f"--max-batch-size {batch} --kv-cache-fraction {rep['kv_fraction']:g}",
                serve]
    qformat = "fp8" if row["weights"] == "fp8" else "full_prec"
    kv = " --kv_cache_dtype fp8" if row["kv_cache"] == "fp8" else ""
    return [f"# {row['weights']} weights / {row['kv_cache']} KV cache: this exporter does not write FP8 checkpoints "
            "(a later `quantize` step); ModelOpt does, through TensorRT-LLM <= 1.2's examples:",
            f"python examples/quantization/quantize.py --model_dir {source} --dtype bfloat16 --qformat {qformat}{kv} "
            f"--tp_size {tp} --pp_size {pp} --output_dir engines/{name}/checkpoint"
            + ("   # quantize.py has no parallel-embedding flag: until `quantize` writes the split, the "
               "'whole' row's figures apply" if pe else ""),
            f"trtllm-build --checkpoint_dir engines/{name}/checkpoint --output_dir engines/{name}/trtllm "
            f"--max_seq_len {seq} --max_batch_size {batch} --workers {tp * pp}",
            serve]


def format_plan(rep: dict[str, Any], spec: ModelSpec, *, top: int = 12, source: str = "SRC") -> str:
    rows = rep["options"]
    nodes = f" x {rep['nodes']} nodes" if rep["nodes"] > 1 else ""
    lines = [f"{rep['gpus_per_node']} x {rep['gpu']}{nodes}: {sum(r['fits'] for r in rows)} of {len(rows)} layouts fit "
             f"{spec.architecture} ({spec.num_layers} layers, {len(spec.attention_layers())} with a KV cache) "
             f"at --seq-len {rep['seq_len']}, --batch {rep['batch']}",
             "assumptions:"] + [f"  - {a}" for a in rep["assumptions"]] + [""]
    head = (f"{'#':>3}  {'tp':>2} {'pp':>2} {'weights':>7} {'kv':>4} {'embed':>6}  {'weights/GPU':>11}  "
            f"{'free/GPU':>9}  {'KV/token/GPU':>12}  {'KV tokens':>10}  {'seqs':>5}  {'x':>2}  {'syncs':>5}  verdict")
    lines.append(head)
    lines.append("     (seqs: concurrent sequences of --seq-len per copy of the layout; x: copies the GPUs hold; "
                 "syncs: collectives + stage hand-offs per token)")
    shown = [r for r in rows if r["fits"]][:top] or rows[:top]
    for r in shown:
        verdict = ("serves --batch" if r["meets_batch"] else f"only {r['total_sequences']} of --batch") if r["fits"] \
            else f"does not fit: {r['why']}"
        emb, free = "split" if r["parallel_embedding"] else "whole", max(r["rank_free_bytes"], 0)
        lines.append(f"{r['rank']:>3}  {r['tp']:>2} {r['pp']:>2} {r['weights']:>7} {r['kv_cache']:>4} "
                     f"{emb:>6}  {human_bytes(r['rank_weight_bytes']):>11}  "
                     f"{human_bytes(free):>9}  {human_bytes(r['rank_kv_bytes_per_token']):>12}  "
                     f"{r['kv_tokens_per_rank']:>10,}  {r['max_sequences']:>5}  {r['replicas']:>2}  "
                     f"{r['sync_points_per_token']:>5}  {verdict}")
    if len(rows) > len(shown):
        lines.append(f"     ... {len(rows) - len(shown)} more (--top, or --json for all)")
    lines.append("")
    chosen = rep["chosen"]
    if chosen is None:
        best = rows[0] if rows else None
        lines.append(f"DOES NOT FIT on {rep['gpus_per_node'] * rep['nodes']} x {rep['gpu']}"
                     + (f": the closest layout ({best['label']}) is short by {human_bytes(best['shortfall_bytes'])} "
                        f"per GPU ({best['why']})" if best else ": no layout divides this model"))
        return "\n".join(lines)
    copies = f" on each of {chosen['replicas']} replicas" if chosen["replicas"] > 1 else ""
    lines.append(f"chosen: #{chosen['rank']} {chosen['label']}: {chosen['max_sequences']} sequences of "
                 f"{rep['seq_len']} tokens at once{copies}, {chosen['sync_points_per_token']} sync points per token")
    lines += [f"  {c}" for c in commands(rep, chosen, source)]
    bf16 = rep["best_bf16"]
    if bf16 is not None and bf16 is not chosen:
        lines += ["", f"best layout this exporter writes today (bf16 weights and KV): #{bf16['rank']} {bf16['label']}: "
                      f"{bf16['max_sequences']} sequences"]
        lines += [f"  {c}" for c in commands(rep, bf16, source)]
    elif bf16 is None:
        lines += ["", "no bf16 layout fits: the plan needs an FP8 checkpoint (not written by this exporter yet)"]
    return "\n".join(lines)

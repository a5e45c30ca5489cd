"""`bench decode`: prefill and decode throughput per runtime (registry name) and tp, plus sync points.

Figures are measured in one run against the tp=1 baseline of that same run, so machine noise
hits all rows alike. Timings are driver wall-clock (they include the pipe round trip to the
workers, which a real deployment also pays).
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from export.runtime import registry
from export.runtime.engine import Engine
from export.runtime.llama_bench import run_llama_bench
from export.runtime.roofline import arithmetic_ms, matmul_params, measure_machine
from export.runtime.sampling import SamplingParams
from export.spec import DTYPE_BYTES, normalize_dtype


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def _decode_rate(eng: Engine, prompts: list[list[int]], steps: int) -> tuple[float, dict[str, float]]:
    """Tokens/s over `steps` decode steps (the prefill's first token is not counted), and rank 0's
    collectives and stage-to-stage transfers per forward pass along the pipeline (prefill and each
    decode step run the same layers, so they sync alike)."""
    before = eng.stats()
    steps_iter = eng._steps(prompts, SamplingParams(max_tokens=steps + 1))
    next(steps_iter)  # prefill done
    t0 = time.perf_counter()
    n = sum(len(step) for step in steps_iter)
    dt = time.perf_counter() - t0
    after = eng.stats()
    column = [r for r in eng.mapping.ranks() if eng.mapping.tp_rank(r) == 0]  # one rank per stage: the path
    syncs = {k: sum(after[r][k] - before[r][k] for r in column) / (steps + 1)
             for k in ("tp_collectives", "pp_transfers")}
    return n / dt, syncs


def _prefill_rate(eng: Engine, prompts: list[list[int]], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.generate(prompts, SamplingParams(max_tokens=1))
        best = min(best, time.perf_counter() - t0)
    return sum(map(len, prompts)) / best


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _measure(eng: Engine, prompts: list[list[int]], batches: tuple[int, ...], steps: int) -> dict[str, float]:
    """One repeat of one engine: prefill and each batch size's decode tokens/s, sync points."""
    row = {"prefill_tokens_per_s": _prefill_rate(eng, prompts, repeats=1)}
    for b in batches:
        rate, syncs = _decode_rate(eng, prompts[:b], steps)
        row[f"decode_b{b}_tokens_per_s"] = rate
    row["sync_points_per_token"] = syncs["tp_collectives"] + syncs["pp_transfers"]
    return row


def bench_decode(ckpt: Path, tps: list[int], *, pp: int = 1, prompt_len: int = 128, batches: tuple[int, ...] = (1, 8),
                 steps: int = 32, dtype: str = "float32", threads: int = 1, seed: int = 0,
                 runtimes: tuple[str, ...] = ("torch",), repeats: int = 3,
                 llama_cpp: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """One row per runtime and tp (a runtime that is not parallel, e.g. onnx: tp = pp = 1 only);
    ratios are against the first row. Every engine is started first, then the repeats alternate
    between them (and llama-bench, when given) so machine load hits all rows alike; each figure
    is the median over the repeats. Batch-1 rows also get ms/token, the roofline's arithmetic
    ms/token and their difference, the per-step overhead (`roofline.py`)."""
    torch.set_num_threads(threads)  # the in-process tp=1 engine gets the same threads as each worker
    runs = [(rt, tp, pp) for rt in runtimes for tp in tps if registry.get(rt).runs(tp, pp)]
    samples: list[list[dict[str, float]]] = [[] for _ in runs]
    llama: list[float] = []
    with ExitStack() as stack:
        engines = [stack.enter_context(Engine.start(ckpt, tp=tp, pp=p, dtype=dtype, threads=threads, runtime=rt))
                   for rt, tp, p in runs]
        spec = engines[0].spec
        prompts = _prompts(spec.vocab, max(batches), prompt_len, seed)
        for eng in engines:
            eng.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
        for _ in range(repeats):
            for eng, got in zip(engines, samples):
                got.append(_measure(eng, prompts, batches, steps))
            if llama_cpp is not None:
                llama.append(run_llama_bench(*llama_cpp, threads=threads))
        kv = [sum(s["kv_bytes_per_token"] for s in eng.stats()) for eng in engines]
    machine = measure_machine(DTYPE_BYTES[normalize_dtype(dtype)] * matmul_params(spec))
    arith = arithmetic_ms(spec, prompt_len + steps // 2, machine, normalize_dtype(dtype))
    rows = []
    for (rt, tp, p), got, kv_bytes in zip(runs, samples, kv):
        row: dict[str, Any] = {"runtime": rt, "tp": tp, "pp": p}
        row.update({k: _median([g[k] for g in got]) for k in got[0]})
        row["kv_cache_bytes_per_token"] = kv_bytes
        if "decode_b1_tokens_per_s" in row:
            ms = 1e3 / row["decode_b1_tokens_per_s"]
            row.update(decode_b1_ms_per_token=ms, arithmetic_ms_per_token=arith, overhead_ms_per_token=ms - arith)
            if llama:
                row["vs_llama_cpp_b1"] = row["decode_b1_tokens_per_s"] / _median(llama)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in [k for k in row if k.endswith("_per_s")]:
            row[key.replace("tokens_per_s", "vs_base")] = row[key] / base[key]
    report = {"checkpoint": str(ckpt), "dtype": dtype, "threads_per_rank": threads, "prompt_len": prompt_len,
              "decode_steps": steps, "repeats": repeats, "layers": spec.num_layers, "hidden": spec.hidden,
              "model_sync_points": spec.sync_points_per_token(), "load_average": list(os.getloadavg()),
              "roofline": {"matmul_gflops": machine.matmul_gflops, "memory_gbps": machine.memory_gbps,
                           "matmul_params": matmul_params(spec), "arithmetic_ms_per_token": arith},
              "results": rows}
    if llama:
        report["llama_cpp_decode_tokens_per_s"] = _median(llama)
    return report


def format_table(report: dict[str, Any]) -> str:
    rows = report["results"]
    batches = [k.split("_")[1][1:] for k in rows[0] if k.startswith("decode_b") and k.endswith("tokens_per_s")]
    per_step = "overhead_ms_per_token" in rows[0]
    head = (["runtime", "tp", "pp", "prefill tok/s"] + [f"decode b{b} tok/s" for b in batches]
            + (["b1 ms/tok", "overhead ms/tok"] if per_step else []) + ["syncs/token", "KV B/token"])
    lines = [head]
    for r in rows:
        lines.append([r.get("runtime", "torch"), str(r["tp"]), str(r["pp"]),
                      f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_vs_base']:.2f}x)"]
                     + [f"{r[f'decode_b{b}_tokens_per_s']:.1f} ({r[f'decode_b{b}_vs_base']:.2f}x)" for b in batches]
                     + ([f"{r['decode_b1_ms_per_token']:.2f}", f"{r['overhead_ms_per_token']:.2f}"] if per_step else [])
                     + [f"{r['sync_points_per_token']:.0f}", str(r["kv_cache_bytes_per_token"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out + _footer(report))


def _footer(report: dict[str, Any]) -> list[str]:
    """The roofline the overhead column subtracts, the load, and llama.cpp's figure if measured."""
    out = []
    roof = report.get("roofline")
    if roof:
        out.append(f"roofline: {roof['matmul_params'] / 1e6:.2f}M matmul params/token, "
                   f"{roof['matmul_gflops']:.1f} GFLOP/s, {roof['memory_gbps']:.1f} GB/s measured -> "
                   f"{roof['arithmetic_ms_per_token']:.3f} ms/token arithmetic at batch 1")
    if "load_average" in report:
        out.append("load average: " + " ".join(f"{x:.2f}" for x in report["load_average"])
                   + f" (medians of {report.get('repeats', 1)} interleaved repeats)")
    if "llama_cpp_decode_tokens_per_s" in report:
        ours = ", ".join(f"{r['runtime']} {r['vs_llama_cpp_b1']:.2f}x" for r in report["results"]
                         if "vs_llama_cpp_b1" in r)
        out.append(f"llama.cpp (llama-bench tg64): {report['llama_cpp_decode_tokens_per_s']:.1f} tok/s; "
                   f"batch 1 vs llama.cpp: {ours}")
    return out

"""`bench decode`: prefill and decode throughput per runtime (registry name) and tp, plus sync points.

Figures are measured in one run against the tp=1 baseline of that same run, so machine noise
hits all rows alike. Timings are driver wall-clock (they include the pipe round trip to the
workers, which a real deployment also pays).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from export.runtime import registry
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingParams


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


def bench_one(ckpt: Path, tp: int, pp: int, *, prompt_len: int, batches: tuple[int, ...], steps: int,
              dtype: str, threads: int, seed: int, runtime: str = "torch") -> dict[str, Any]:
    with Engine.start(ckpt, tp=tp, pp=pp, dtype=dtype, threads=threads, runtime=runtime) as eng:
        prompts = _prompts(eng.spec.vocab, max(batches), prompt_len, seed)
        eng.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
        row: dict[str, Any] = {"runtime": runtime, "tp": tp, "pp": pp,
                               "prefill_tokens_per_s": _prefill_rate(eng, prompts, repeats=2)}
        for b in batches:
            rate, syncs = _decode_rate(eng, prompts[:b], steps)
            row[f"decode_b{b}_tokens_per_s"] = rate
        row["sync_points_per_token"] = syncs["tp_collectives"] + syncs["pp_transfers"]
        row["kv_cache_bytes_per_token"] = sum(s["kv_bytes_per_token"] for s in eng.stats())
    return row


def bench_decode(ckpt: Path, tps: list[int], *, pp: int = 1, prompt_len: int = 128, batches: tuple[int, ...] = (1, 8),
                 steps: int = 32, dtype: str = "float32", threads: int = 1, seed: int = 0,
                 runtimes: tuple[str, ...] = ("torch",)) -> dict[str, Any]:
    """One row per runtime and tp (a runtime that is not parallel, e.g. onnx: tp = pp = 1 only);
    ratios are against the first row, measured in the same run."""
    torch.set_num_threads(threads)  # the in-process tp=1 engine gets the same threads as each worker
    runs = [(rt, tp, pp) for rt in runtimes for tp in tps if registry.get(rt).runs(tp, pp)]
    rows = [bench_one(ckpt, tp, p, prompt_len=prompt_len, batches=batches, steps=steps, dtype=dtype,
                      threads=threads, seed=seed, runtime=rt) for rt, tp, p in runs]
    base = rows[0]
    for row in rows:
        for key in [k for k in row if k.endswith("_per_s")]:
            row[key.replace("tokens_per_s", "vs_base")] = row[key] / base[key]
    from export.sources import open_source
    spec = open_source(Path(ckpt))[0]
    return {"checkpoint": str(ckpt), "dtype": dtype, "threads_per_rank": threads, "prompt_len": prompt_len,
            "decode_steps": steps, "layers": spec.num_layers, "hidden": spec.hidden,
            "model_sync_points": spec.sync_points_per_token(), "results": rows}


def format_table(report: dict[str, Any]) -> str:
    rows = report["results"]
    batches = [k.split("_")[1][1:] for k in rows[0] if k.startswith("decode_b") and k.endswith("tokens_per_s")]
    head = (["runtime", "tp", "pp", "prefill tok/s"] + [f"decode b{b} tok/s" for b in batches]
            + ["syncs/token", "KV B/token"])
    lines = [head]
    for r in rows:
        lines.append([r.get("runtime", "torch"), str(r["tp"]), str(r["pp"]),
                      f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_vs_base']:.2f}x)"]
                     + [f"{r[f'decode_b{b}_tokens_per_s']:.1f} ({r[f'decode_b{b}_vs_base']:.2f}x)" for b in batches]
                     + [f"{r['sync_points_per_token']:.0f}", str(r["kv_cache_bytes_per_token"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)

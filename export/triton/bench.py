"""`bench serve`: what Triton costs over the engine it serves, measured in one run.

The same prompt goes (a) through tritonserver's ensemble and BLS with gRPC streaming and (b)
straight to `Engine.stream` on the same rank files at the same TP, after the server has stopped so
both see the same CPUs. Reported: time to first token, decode tokens/s, and their ratios to (b).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from export.triton.client import Request, query
from export.triton.package import package_repo
from export.triton.server import start_server


def _engine_baseline(engine_dir: Path, prompt: str, max_tokens: int, repeats: int,
                     runtime: str = "torch") -> dict[str, float]:
    from export.manifest import Manifest
    from export.runtime.engine import Engine
    from export.triton.pipeline import load_tokenizer

    m = Manifest.load(engine_dir)
    tok = load_tokenizer(str(engine_dir / m.tokenizer)) if m.tokenizer else None
    ids = tok.encode(prompt) if tok else [1, 2, 3]
    stop = (tok.eos_token_id,) if tok and tok.eos_token_id is not None else ()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Triton engine model runs its driver
    try:
        engine = Engine.start(engine_dir / m.checkpoint, runtime=runtime)
        return _time_stream(engine, ids, max_tokens, stop, repeats)
    finally:
        torch.set_num_threads(threads)


def _time_stream(engine: Any, ids: list[int], max_tokens: int, stop: tuple[int, ...],
                 repeats: int) -> dict[str, float]:
    from export.runtime.sampling import SamplingParams

    ttfts, rates, counts = [], [], []
    with engine:
        for _ in range(repeats + 1):  # the first run warms up
            start, first, n = time.perf_counter(), None, 0
            for new in engine.stream(ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop)):
                n += len(new)
                first = first or time.perf_counter()
            end = time.perf_counter()
            ttfts.append(first - start)
            rates.append((n - 1) / (end - first) if n > 1 and end > first else 0.0)
            counts.append(n)
    return {"ttft_s": statistics.median(ttfts[1:]), "tokens_per_s": statistics.median(rates[1:]),
            "tokens": counts[-1]}


def bench_serve(engine_dir: str | Path, *, prompt: str = "The quick brown fox", max_tokens: int = 64,
                repeats: int = 3, models: tuple[str, ...] = ("ensemble", "tensorrt_llm_bls"),
                backend: str = "cpu") -> dict[str, Any]:
    """Median TTFT and decode tokens/s per path; ratios are against the direct engine.

    backend "onnx" serves engines/NAME/onnx (ONNX Runtime) and times `Engine.stream(runtime="onnx")`.
    """
    engine_dir = Path(engine_dir)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        repo = package_repo(engine_dir, Path(tmp) / "repo", backend=backend)
        t = time.perf_counter()
        with start_server(repo) as server:
            startup = time.perf_counter() - t
            for model in models:
                results = [query(Request(prompt, max_tokens=max_tokens, stream=True), url=server.grpc_url,
                                 model=model) for _ in range(repeats + 1)][1:]
                rows[f"triton {model} (grpc stream)"] = {
                    "ttft_s": statistics.median(r.ttft_s or 0.0 for r in results),
                    "tokens_per_s": statistics.median(r.tokens_per_s or 0.0 for r in results),
                    "tokens": results[-1].tokens}
    base = _engine_baseline(engine_dir, prompt, max_tokens, repeats, "onnx" if backend == "onnx" else "torch")
    rows = {"engine.stream (baseline)": base, **rows}
    for r in rows.values():
        r["ttft_ratio"] = r["ttft_s"] / base["ttft_s"] if base["ttft_s"] else float("nan")
        r["rate_ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else float("nan")
    return {"engine_dir": str(engine_dir), "backend": backend, "server_start_s": startup, "max_tokens": max_tokens,
            "repeats": repeats, "rows": rows}


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"backend {rep.get('backend', 'cpu')}; "
             f"server start (5 models, engine load): {rep['server_start_s']:.1f} s; "
             f"median of {rep['repeats']} runs, max_tokens {rep['max_tokens']}",
             f"{'path':36} {'tokens':>6} {'TTFT ms':>8} {'x base':>7} {'tok/s':>8} {'x base':>7}"]
    for name, r in rep["rows"].items():
        lines.append(f"{name:36} {r['tokens']:>6} {r['ttft_s'] * 1000:>8.1f} {r['ttft_ratio']:>7.2f} "
                     f"{r['tokens_per_s']:>8.1f} {r['rate_ratio']:>7.2f}")
    return "\n".join(lines)

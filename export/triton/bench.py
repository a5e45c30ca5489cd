"""`bench serve`: streaming latency and throughput at several concurrencies, Triton vs the direct runtime.

For each engine dir the same work runs twice in one run: (a) through tritonserver's `ensemble`
with gRPC streaming clients (the cpu flavour: the engine's in-flight batching scheduler inside the
python backend), then, after the server has stopped so both see the same CPUs, (b) straight on
`Engine.submit` streams in this process at the same TP with the same scheduler limits. At each
concurrency C, C clients each send `rounds` requests back to back (mixed prompt lengths, greedy,
the end token ignored so every request makes exactly `max_tokens` tokens; at least MIN_REQUESTS
requests per level).

Reported per level: time to first token and inter-token latency p50/p99, output tokens/s (all
tokens over the level's wall time), the ratio to concurrency 1, and Triton's cost over (b); per
engine, the server's peak RSS (process tree) and the collectives per token the ranks issued.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.triton.client import Request, query
from export.triton.package import package_repo
from export.triton.procs import tree_rss_bytes
from export.triton.server import start_server

CONCURRENCY = (1, 4, 16)
MIN_REQUESTS = 24  # per level: at 8 the 1-stream figures moved by +-15% between runs on the 2-core VM
PROMPTS = ("def main():", "import os\nimport sys\n\n", "class Config:\n    \"\"\"Settings read from the environment.",
           "The quick brown fox", "for i in range(10):\n    print(i)\n# now the same loop, but counting down",
           "x = 1", "with open(path) as f:\n    data = f.read()\n    lines = data.splitlines()\n    for line in lines:")


@dataclass(frozen=True)
class Timing:
    """One request: seconds to its first token, the gaps between later tokens, tokens received."""

    ttft_s: float
    itl_s: list[float]
    tokens: int


def _gaps(arrivals: list[tuple[float, int]]) -> list[float]:
    """Inter-token latency: each later response's gap, spread over the tokens it carried."""
    out = []
    for (t0, _), (t1, n) in itertools.pairwise(arrivals):
        out += [(t1 - t0) / n] * n
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_level(one: Callable[[int], Timing], concurrency: int, rounds: int, min_requests: int = 0) -> dict[str, Any]:
    """`concurrency` client threads, each running `rounds` requests back to back (more when that
    makes fewer than `min_requests` in all, so low levels get enough samples); summary figures."""
    rounds = max(rounds, -(-min_requests // concurrency))
    timings: list[Timing] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(rounds):
            try:
                t = one(c * rounds + r)
            except Exception as e:  # reported, not hidden: a level with errors says so
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                timings.append(t)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [t.ttft_s for t in timings]
    itl = [g for t in timings for g in t.itl_s]
    tokens = sum(t.tokens for t in timings)
    return {"concurrency": concurrency, "requests": len(timings), "errors": errors, "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": 1000 * _pct(ttft, 0.5), "ttft_p99_ms": 1000 * _pct(ttft, 0.99),
            "itl_p50_ms": 1000 * _pct(itl, 0.5), "itl_p99_ms": 1000 * _pct(itl, 0.99)}


WARM_UP_REQUESTS = 4  # a freshly started server ran its first few requests up to 25% slower


def _warm_up(one: Callable[[int], Timing], tries: int = 3, requests: int = WARM_UP_REQUESTS) -> None:
    """`requests` untimed requests before the first level; a fresh connection may be refused once
    right after startup."""
    for attempt in range(tries):
        try:
            one(0)
            break
        except Exception:
            if attempt == tries - 1:
                raise
            time.sleep(1.0)
    for i in range(1, requests):
        one(i)


def _triton_levels(repo: Path, levels: tuple[int, ...], rounds: int, max_tokens: int,
                   model: str) -> tuple[list, float, int]:
    """Levels through the ensemble; also the server start time and its peak process-tree RSS."""
    t0 = time.perf_counter()
    with start_server(repo) as server:
        startup = time.perf_counter() - t0
        peak = [tree_rss_bytes(server.process.pid)]
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.wait(0.5):
                peak.append(tree_rss_bytes(server.process.pid))

        def one(i: int) -> Timing:
            res = query(Request(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, end_id=-1, temperature=0.0),
                        url=server.grpc_url, model=model, timeout=600)
            return Timing(res.ttft_s or 0.0, _gaps(res.arrivals), res.tokens)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        try:
            _warm_up(one)
            rows = [run_level(one, c, rounds, MIN_REQUESTS) for c in levels]
        finally:
            stop.set()
            sampler.join()
    return rows, startup, max(peak)


def _direct_levels(engine_dir: Path, levels: tuple[int, ...], rounds: int, max_tokens: int,
                   runtime: str = "torch") -> tuple[list, float]:
    """The same work on `Engine` streams in this process; also the ranks' collectives per token."""
    import torch

    from export.manifest import Manifest
    from export.runtime.engine import Engine
    from export.runtime.sampling import SamplingParams
    from export.triton.pipeline import load_tokenizer

    m = Manifest.load(engine_dir)
    tok = load_tokenizer(str(engine_dir / m.tokenizer))
    params = SamplingParams(max_tokens=max_tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Triton engine model runs its driver
    try:
        with Engine.start(engine_dir / m.checkpoint, max_batch=max(levels), max_queue=max(levels),
                          runtime=runtime) as eng:
            def one(i: int) -> Timing:
                start, arrivals = time.perf_counter(), []
                for new in eng.stream(tok.encode(PROMPTS[i % len(PROMPTS)]), params):
                    arrivals.append((time.perf_counter() - start, len(new)))
                return Timing(arrivals[0][0], _gaps(arrivals), sum(n for _, n in arrivals))

            before = eng.stats()
            one(0)  # warm-up, and the sync count of one request
            after = eng.stats()
            for i in range(1, WARM_UP_REQUESTS):  # as much warm-up as the Triton side gets
                one(i)
            column = [r for r in eng.mapping.ranks() if eng.mapping.tp_rank(r) == 0]
            syncs = sum(after[r][k] - before[r][k] for r in column for k in ("tp_collectives", "pp_transfers"))
            rows = [run_level(one, c, rounds, MIN_REQUESTS) for c in levels]
    finally:
        torch.set_num_threads(threads)
    return rows, syncs / max_tokens  # one forward pass per token (the prefill makes the first)


def bench_engine(engine_dir: Path, *, levels: tuple[int, ...], rounds: int, max_tokens: int,
                 model: str = "ensemble", backend: str = "cpu") -> dict[str, Any]:
    """`backend` cpu serves the PyTorch runtime, onnx serves engines/NAME/onnx on ONNX Runtime."""
    from export.manifest import Manifest

    m = Manifest.load(engine_dir)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        repo = package_repo(engine_dir, Path(tmp) / "repo", backend=backend, max_batch_size=max(levels),
                            engine_queue_limit=max(levels))
        triton, startup, peak_rss = _triton_levels(repo, levels, rounds, max_tokens, model)
    direct, syncs = _direct_levels(engine_dir, levels, rounds, max_tokens, "onnx" if backend == "onnx" else "torch")
    for rows in (triton, direct):
        for r in rows:
            r["vs_c1"] = r["tokens_per_s"] / rows[0]["tokens_per_s"] if rows[0]["tokens_per_s"] else float("nan")
    for t, d in zip(triton, direct):
        t["triton_cost"] = d["tokens_per_s"] / t["tokens_per_s"] - 1 if t["tokens_per_s"] else float("nan")
    return {"engine_dir": str(engine_dir), "name": engine_dir.name, "tp": m.tp, "pp": m.pp, "model": model,
            "backend": backend,
            "sync_points_per_token": syncs, "server_start_s": startup, "server_peak_rss_mb": peak_rss / 2**20,
            "triton": triton, "direct": direct}


def bench_serve(engine_dirs: list[str | Path], *, levels: tuple[int, ...] = CONCURRENCY, rounds: int = 2,
                max_tokens: int = 32, model: str = "ensemble", backend: str = "cpu") -> dict[str, Any]:
    """One `bench_engine` per engine dir, in order (e.g. unfused/fused at tp 1 and 2, side by side)."""
    runs = [bench_engine(Path(d), levels=levels, rounds=rounds, max_tokens=max_tokens, model=model, backend=backend)
            for d in engine_dirs]
    return {"levels": list(levels), "rounds_per_client": rounds, "max_tokens": max_tokens, "model": model,
            "prompts": len(PROMPTS), "runs": runs}


def format_report(rep: dict[str, Any]) -> str:
    head = ["engine", "tp", "syncs/tok", "path", "conc", "req", "TTFT p50/p99 ms", "ITL p50/p99 ms", "tok/s",
            "x c=1", "Triton cost"]
    lines = [head]
    for run in rep["runs"]:
        for path in ("triton", "direct"):
            for r in run[path]:
                cost = f"{100 * r['triton_cost']:+.0f}%" if path == "triton" else ""
                lines.append([run["name"], str(run["tp"]), f"{run['sync_points_per_token']:.0f}", path,
                              str(r["concurrency"]), str(r["requests"]) + (f" ({len(r['errors'])} err)" if r["errors"]
                                                                            else ""),
                              f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f}",
                              f"{r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
                              f"{r['vs_c1']:.2f}", cost])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{run['name']}: server start {run['server_start_s']:.1f} s, peak server RSS "
             f"{run['server_peak_rss_mb']:.0f} MiB (process tree)" for run in rep["runs"]]
    return "\n".join(out + notes)


def plot(rep: dict[str, Any], path: Path) -> None:
    """tokens/s against concurrency: one solid line (Triton) and one dashed (direct) per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(rep["runs"]):
        color = f"C{i}"
        for p, style in (("triton", "-o"), ("direct", "--s")):
            rows = run[p]
            ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], style, color=color,
                    label=f"{run['name']} tp{run['tp']} {p}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rep["levels"], [str(c) for c in rep["levels"]])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"bench serve ({rep.get('model', 'ensemble')}, gRPC streaming): greedy, "
                 f"{rep['max_tokens']} tokens per request")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The two target figures per engine: tokens/s at the top level over c=1, Triton cost at c=1."""
    return {run["name"]: {"scaling": run["triton"][-1]["vs_c1"], "triton_cost_c1": run["triton"][0]["triton_cost"]}
            for run in rep["runs"]}

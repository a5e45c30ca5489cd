"""`bench serve`: streaming latency and throughput at several concurrencies, Triton vs the direct runtime.

For each engine dir the same work runs two ways in one run: (a) through tritonserver's `ensemble`
with gRPC streaming clients that keep their connection open (the cpu flavour: the engine's
in-flight batching scheduler inside the python backend), and (b) straight on `Engine.submit`
streams in this process at the same TP with the same scheduler limits. Both are up at once and
each level runs as PAIRS interleaved blocks of (a) and (b) (one idles while the other runs), so
both see the same CPUs and the same drift of a shared machine. At each concurrency C, C clients
each send `rounds` requests back to back (mixed prompt lengths, greedy, the end token ignored so
every request makes exactly `max_tokens` tokens; at least MIN_REQUESTS requests per level and path).

Reported per level: time to first token and inter-token latency p50/p99, output tokens/s (all
tokens over the level's wall time), the ratio to concurrency 1, and Triton's cost over (b) (the
median over the block pairs); per engine, the server's peak RSS (process tree) and the
collectives per token the ranks issued.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.triton.client import QueryResult, Request, StreamSession, grpc_inputs
from export.triton.package import package_repo, served_runtime
from export.triton.procs import tree_rss_bytes
from export.triton.server import start_server

CONCURRENCY = (1, 4, 16)
MIN_REQUESTS = 24  # per level and path: at 8 the 1-stream figures moved by +-15% between runs on the 2-core VM
PAIRS = 6  # Triton/direct block pairs per level, interleaved
PROMPTS = ("def main():", "import os\nimport sys\n\n", "class Config:\n    \"\"\"Settings read from the environment.",
           "The quick brown fox", "for i in range(10):\n    print(i)\n# now the same loop, but counting down",
           "x = 1", "with open(path) as f:\n    data = f.read()\n    lines = data.splitlines()\n    for line in lines:")


@dataclass(frozen=True)
class Timing:
    """One request: seconds to its first token, the gaps between later tokens, tokens received, and
    the text with the index of the prompt it answered (to check both paths said the same)."""

    ttft_s: float
    itl_s: list[float]
    tokens: int
    text: str = ""
    prompt: int = -1


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


@dataclass
class Block:
    """One level's clients run once: their timings, errors and wall time."""

    concurrency: int
    timings: list[Timing]
    errors: list[str]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.wall_s if self.wall_s > 0 else 0.0


def run_block(one: Callable[[int], Timing], concurrency: int, rounds: int) -> Block:
    """`concurrency` client threads, each running `rounds` requests back to back."""
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
    return Block(concurrency, timings, errors, time.perf_counter() - start)


def summarize(blocks: list[Block]) -> dict[str, Any]:
    """Summary figures of one level over its blocks: tokens/s = all tokens over the blocks' wall time."""
    timings = [t for b in blocks for t in b.timings]
    wall = sum(b.wall_s for b in blocks)
    ttft = [t.ttft_s for t in timings]
    itl = [g for t in timings for g in t.itl_s]
    tokens = sum(t.tokens for t in timings)
    return {"concurrency": blocks[0].concurrency, "requests": len(timings),
            "errors": [e for b in blocks for e in b.errors], "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": 1000 * _pct(ttft, 0.5), "ttft_p99_ms": 1000 * _pct(ttft, 0.99),
            "itl_p50_ms": 1000 * _pct(itl, 0.5), "itl_p99_ms": 1000 * _pct(itl, 0.99)}


def interleaved_levels(triton: Callable[[int], Timing], direct: Callable[[int], Timing], levels: tuple[int, ...],
                       rounds: int, pairs: int = PAIRS,
                       min_requests: int = MIN_REQUESTS) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each level as `pairs` Triton/direct block pairs in ABBA order (T D, D T, T D, ...).

    The speed of a shared VM drifts over seconds (the direct runtime alone measured 67-106 tokens/s
    between runs here); blocks side by side see the same drift, so their ratio is what is compared.
    Each path sends at least max(`min_requests`, `rounds` x C) requests per level, spread over its
    blocks (every client at least one per block). Triton's cost at a level is the direct tokens/s
    over Triton's, each over all of its blocks, minus 1; the per-pair costs show the spread."""
    if pairs < 1:
        raise ExportError(f"pairs must be at least 1, got {pairs}")
    t_rows, d_rows = [], []
    for c in levels:
        per_client = max(1, -(-max(min_requests, rounds * c) // (pairs * c)))
        t_blocks: list[Block] = []
        d_blocks: list[Block] = []
        for p in range(pairs):
            order = ((triton, t_blocks), (direct, d_blocks))
            for one, out in order if p % 2 == 0 else order[::-1]:
                out.append(run_block(one, c, per_client))
        t_row, d_row = summarize(t_blocks), summarize(d_blocks)
        t_row["triton_cost"] = _cost(d_row["tokens_per_s"], t_row["tokens_per_s"])
        t_row["triton_cost_pairs"] = [_cost(d.tokens_per_s, t.tokens_per_s) for t, d in zip(t_blocks, d_blocks)]
        t_row["prompts_differing"] = _differing(t_blocks, d_blocks)
        t_rows.append(t_row)
        d_rows.append(d_row)
    return t_rows, d_rows


def _differing(a: list[Block], b: list[Block]) -> list[int]:
    """Prompt indices whose texts differ between the two paths (greedy, same weights: expect none)."""
    def texts(blocks: list[Block]) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for t in (t for blk in blocks for t in blk.timings):
            out.setdefault(t.prompt, set()).add(t.text)
        return out

    ta, tb = texts(a), texts(b)
    return sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))


def _cost(direct_tps: float, triton_tps: float) -> float:
    return direct_tps / triton_tps - 1 if triton_tps else float("nan")


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


class _Sessions:
    """Open gRPC streams shared by the client threads: each request borrows one and gives it back, so
    a level of C clients holds C connections and no request pays for connecting."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.idle: queue.SimpleQueue[StreamSession] = queue.SimpleQueue()
        self.all: list[StreamSession] = []
        self.lock = threading.Lock()

    def infer(self, inputs: list) -> QueryResult:
        try:
            session = self.idle.get_nowait()
        except queue.Empty:
            session = StreamSession(self.url, self.model, timeout=600)
            with self.lock:
                self.all.append(session)
        try:
            return session.infer(inputs)
        finally:
            self.idle.put(session)

    def close(self) -> None:
        for s in self.all:
            s.close()


@contextlib.contextmanager
def _triton_side(repo: Path, max_tokens: int, model: str) -> Iterator[tuple[Callable[[int], Timing], dict]]:
    """A request through the served `model` over a kept-open stream; `info` gets the server's start
    time now and its peak process-tree RSS (sampled every 0.5 s) when the block ends."""
    info: dict[str, float] = {}
    t0 = time.perf_counter()
    with start_server(repo) as server:
        info["startup_s"] = time.perf_counter() - t0
        peak = [tree_rss_bytes(server.process.pid)]
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.wait(0.5):
                peak.append(tree_rss_bytes(server.process.pid))

        sessions = _Sessions(server.grpc_url, model)

        def one(i: int) -> Timing:
            req = Request(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, end_id=-1, temperature=0.0)
            res = sessions.infer(grpc_inputs(req.fields()))
            return Timing(res.ttft_s or 0.0, _gaps(res.arrivals), res.tokens, res.text, i % len(PROMPTS))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        try:
            _warm_up(one)
            yield one, info
        finally:
            stop.set()
            sampler.join()
            sessions.close()
            info["peak_rss_bytes"] = max(peak)


@contextlib.contextmanager
def _direct_side(engine_dir: Path, levels: tuple[int, ...], max_tokens: int,
                 runtime: str = "torch") -> Iterator[tuple[Callable[[int], Timing], float]]:
    """A request on `Engine` streams in this process (driver at 1 torch thread, as in the server,
    same slots); also the collectives per token the ranks issued for one request."""
    import torch

    from export.engine_dir import EngineDir
    from export.runtime.detok import IncrementalDecoder
    from export.runtime.engine import Engine
    from export.runtime.sampling import SamplingParams
    from export.triton.pipeline import load_tokenizer

    engine = EngineDir(engine_dir)
    tok = load_tokenizer(str(engine.tokenizer))
    params = SamplingParams(max_tokens=max_tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Engine.start(engine.checkpoint, max_batch=max(levels), max_queue=max(levels),
                          runtime=runtime) as eng:
            def one(i: int) -> Timing:  # text in, streamed text out: the same work as the ensemble
                start, arrivals, pieces = time.perf_counter(), [], []
                decoder = IncrementalDecoder(tok)
                for new in eng.stream(tok.encode(PROMPTS[i % len(PROMPTS)]), params):
                    pieces.append(decoder.push(new))
                    arrivals.append((time.perf_counter() - start, len(new)))
                pieces.append(decoder.finish())
                return Timing(arrivals[0][0], _gaps(arrivals), sum(n for _, n in arrivals), "".join(pieces),
                              i % len(PROMPTS))

            before = eng.stats()
            one(0)  # warm-up, and the sync count of one request
            after = eng.stats()
            for i in range(1, WARM_UP_REQUESTS):  # as much warm-up as the Triton side gets
                one(i)
            column = [r for r in eng.mapping.ranks() if eng.mapping.tp_rank(r) == 0]
            syncs = sum(after[r][k] - before[r][k] for r in column for k in ("tp_collectives", "pp_transfers"))
            yield one, syncs / max_tokens  # one forward pass per token (the prefill makes the first)
    finally:
        torch.set_num_threads(threads)


def bench_engine(engine_dir: Path, *, levels: tuple[int, ...], rounds: int, max_tokens: int,
                 model: str = "ensemble", backend: str = "cpu", pairs: int = PAIRS,
                 runtime: str | None = None) -> dict[str, Any]:
    """Triton serves `package --backend BACKEND --runtime RUNTIME`; the direct side runs that runtime
    (`backend` "onnx" is the older spelling of cpu on runtime onnx)."""
    from export.manifest import Manifest

    m = Manifest.load(engine_dir)
    runtime = served_runtime(backend, runtime, engine_dir)  # what `package` serves: the direct side runs the same
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        repo = package_repo(engine_dir, Path(tmp) / "repo", backend=backend, max_batch_size=max(levels),
                            engine_queue_limit=max(levels), runtime=runtime)
        with _triton_side(repo, max_tokens, model) as (t_one, info), \
                _direct_side(engine_dir, levels, max_tokens, runtime) as (d_one, syncs):
            triton, direct = interleaved_levels(t_one, d_one, levels, rounds, pairs)
    for rows in (triton, direct):
        for r in rows:
            r["vs_c1"] = r["tokens_per_s"] / rows[0]["tokens_per_s"] if rows[0]["tokens_per_s"] else float("nan")
    return {"engine_dir": str(engine_dir), "name": engine_dir.name, "tp": m.tp, "pp": m.pp, "model": model,
            "backend": backend, "runtime": runtime, "pairs": pairs,
            "sync_points_per_token": syncs, "server_start_s": info["startup_s"],
            "server_peak_rss_mb": info["peak_rss_bytes"] / 2**20, "triton": triton, "direct": direct}


def bench_serve(engine_dirs: list[str | Path], *, levels: tuple[int, ...] = CONCURRENCY, rounds: int = 2,
                max_tokens: int = 32, model: str = "ensemble", backend: str = "cpu",
                pairs: int = PAIRS, runtime: str | None = None) -> dict[str, Any]:
    """One `bench_engine` per engine dir, in order (e.g. unfused/fused at tp 1 and 2, side by side)."""
    runs = [bench_engine(Path(d), levels=levels, rounds=rounds, max_tokens=max_tokens, model=model, backend=backend,
                         pairs=pairs, runtime=runtime)
            for d in engine_dirs]
    return {"levels": list(levels), "rounds_per_client": rounds, "max_tokens": max_tokens, "model": model,
            "pairs": pairs, "prompts": len(PROMPTS), "runs": runs}


def format_report(rep: dict[str, Any]) -> str:
    head = ["engine", "tp", "syncs/tok", "path", "conc", "req", "TTFT p50/p99 ms", "ITL p50/p99 ms", "tok/s",
            "x c=1", "Triton cost [pairs min..max]"]
    lines = [head]
    for run in rep["runs"]:
        for path in ("triton", "direct"):
            for r in run[path]:
                cost = _cost_text(r) if path == "triton" else ""
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
             f"{run['server_peak_rss_mb']:.0f} MiB (process tree); {_texts_note(run)}" for run in rep["runs"]]
    return "\n".join(out + notes)


def _cost_text(row: dict[str, Any]) -> str:
    pairs = row.get("triton_cost_pairs") or []
    spread = f" [{100 * min(pairs):+.0f}..{100 * max(pairs):+.0f}]" if pairs else ""
    return f"{100 * row['triton_cost']:+.0f}%{spread}"


def _texts_note(run: dict[str, Any]) -> str:
    bad = {r["concurrency"]: r["prompts_differing"] for r in run["triton"] if r.get("prompts_differing")}
    if not bad:
        return "Triton's texts equal the direct runtime's"
    return "texts differ from the direct runtime's for " + ", ".join(f"prompts {v} at c={c}" for c, v in bad.items())


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

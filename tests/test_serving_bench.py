"""`bench serve`'s measuring and reporting: levels run concurrently, percentiles, table, PNG."""

from __future__ import annotations

import threading
import time

import pytest

from export.triton.bench import (
    Timing,
    _gaps,
    _pct,
    format_report,
    interleaved_levels,
    plot,
    run_block,
    summarize,
)


def test_gaps_spread_a_response_over_its_tokens_and_percentiles_pick_ranks():
    assert _gaps([(0.1, 1), (0.3, 2), (0.4, 1)]) == pytest.approx([0.1, 0.1, 0.1])
    xs = [float(i) for i in range(101)]
    assert (_pct(xs, 0.5), _pct(xs, 0.99), _pct([], 0.5) != _pct([], 0.5)) == (50.0, 99.0, True)


def test_a_level_runs_its_clients_at_once_and_counts_errors():
    inflight, peak, lock = [0], [0], threading.Lock()

    def one(i: int) -> Timing:
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.05)
        with lock:
            inflight[0] -= 1
        if i == 5:
            raise RuntimeError("engine busy")
        return Timing(0.01, [0.002, 0.004], 3)

    row = summarize([run_block(one, concurrency=4, rounds=2)])
    assert peak[0] == 4 and row["requests"] == 7 and row["errors"] == ["RuntimeError: engine busy"]
    assert row["tokens"] == 21 and 0.09 < row["wall_s"] < 1.0
    assert row["itl_p50_ms"] == 2.0 and row["itl_p99_ms"] == 4.0 and row["ttft_p50_ms"] == 10.0


def test_levels_interleave_triton_and_direct_blocks_abba_and_compare_like_with_like():
    calls: list[str] = []
    lock = threading.Lock()

    def path(name: str, seconds: float, text: str):
        def one(i: int) -> Timing:
            with lock:
                calls.append(name)
            time.sleep(seconds)
            return Timing(0.001, [0.001], 4, text if i % 2 else "same", i % 2)
        return one

    triton, direct = interleaved_levels(path("T", 0.02, "a"), path("D", 0.01, "b"), (1, 2), rounds=1, pairs=3,
                                        min_requests=6)
    abba = ["T", "D", "D", "T", "T", "D"]  # drift hits both paths alike
    assert calls == [x for x in abba for _ in range(2)] * 2  # 2 requests per block: 1 client x 2, then 2 x 1
    assert [r["requests"] for r in triton] == [6, 6] and [r["requests"] for r in direct] == [6, 6]
    assert [len(r["triton_cost_pairs"]) for r in triton] == [3, 3]
    assert 0.6 < triton[0]["triton_cost"] < 1.2  # direct is twice as fast: +100%
    assert triton[0]["prompts_differing"] == [1]  # prompt 1 got "a" through Triton, "b" directly
    with pytest.raises(Exception, match="pairs must be at least 1"):
        interleaved_levels(path("T", 0, ""), path("D", 0, ""), (1,), rounds=1, pairs=0)


def test_report_table_and_plot(tmp_path):
    def level(c: int, tps: float) -> dict:
        return {"concurrency": c, "requests": 2 * c, "errors": [], "tokens": 64 * c, "wall_s": 1.0,
                "tokens_per_s": tps, "ttft_p50_ms": 20.0, "ttft_p99_ms": 30.0, "itl_p50_ms": 5.0,
                "itl_p99_ms": 9.0, "vs_c1": tps / 100, "triton_cost": 0.1,
                "triton_cost_pairs": [0.05, 0.2], "prompts_differing": []}
    run = {"name": "puzzle-tp2", "tp": 2, "sync_points_per_token": 21.0, "server_start_s": 9.0,
           "server_peak_rss_mb": 900.0, "triton": [level(1, 100.0), level(16, 450.0)],
           "direct": [level(1, 110.0), level(16, 500.0)]}
    rep = {"levels": [1, 16], "max_tokens": 32, "runs": [run]}
    table = format_report(rep)
    assert "puzzle-tp2" in table and "+10% [+5..+20]" in table and "texts equal" in table
    assert "4.50" in table and "900 MiB" in table
    plot(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

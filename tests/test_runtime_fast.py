"""The "torch-fast" runtime (export/runtime/fast.py) against the reference Stepper, and the
figures `bench decode` adds for it: roofline overhead and the llama-bench ratio."""

from __future__ import annotations

import json
import stat
import sys

import pytest
import torch

from export.errors import ExportError
from export.runtime.engine import Engine
from export.runtime.llama_bench import llama_bench_command, parse_llama_bench, run_llama_bench
from export.runtime.roofline import Machine, arithmetic_ms, decode_cost, matmul_params
from export.runtime.sampling import SamplingParams
from export.runtime.steps import Decode, Prefill, Reserve
from export.synthetic import write_random_checkpoint
from tests.conftest import hetero_spec, llama_spec

PUZZLE = "export/demo/models/puzzle"


@pytest.fixture(scope="module")
def hetero_ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("fast") / "ckpt", hetero_spec(), seed=3, std=0.08)


def _steps(source, runtime: str) -> list[torch.Tensor]:
    """Mixed-length prefill, decode on contiguous slots, then on slots out of order and a subset."""
    with Engine.start(source, runtime=runtime) as eng:
        call = eng.backend.call
        call(Reserve(4, 64))
        out = [call(Prefill((0, 1, 2), ((5, 6, 7, 8), (9, 10), (11, 12, 13, 14, 15))))[0]]
        out += [call(Decode((0, 1, 2), (s, s + 1, s + 2)))[0] for s in range(6)]
        out += [call(Decode((2, 0), (3, 4)))[0], call(Decode((1,), (7,)))[0]]
        out += [call(Prefill((3,), ((1, 2, 3),)))[0], call(Decode((1, 3), (8, 9)))[0]]
    return out


@pytest.mark.parametrize("which", ["hetero", "puzzle"])
def test_logits_match_the_reference_runtime(which, hetero_ckpt):
    source = hetero_ckpt if which == "hetero" else PUZZLE
    for ref, fast in zip(_steps(source, "torch"), _steps(source, "torch-fast"), strict=True):
        assert ref.shape == fast.shape
        assert (ref - fast).abs().max() <= 1e-4


def test_greedy_tokens_are_identical():
    prompts = torch.randint(0, 4096, (3, 20), generator=torch.Generator().manual_seed(0)).tolist()
    prompts[1] = prompts[1][:7]
    params = SamplingParams(max_tokens=12)
    outs = {}
    for rt in ("torch", "torch-fast"):
        with Engine.start(PUZZLE, runtime=rt) as eng:
            outs[rt] = eng.generate(prompts, params)
    assert outs["torch"] == outs["torch-fast"]


def test_refuses_tp_above_one(hetero_ckpt):
    with pytest.raises(ExportError, match="tp = pp = 1"):
        Engine.start(hetero_ckpt, runtime="torch-fast", tp=2)


def test_roofline_counts_every_matmul_once():
    spec = llama_spec(layers=2)  # hidden 64, heads 4 x 16, kv 2, width 256, vocab 128, untied
    per_layer = 64 * 64 + 2 * (2 * 16 * 64) + 64 * 64 + 3 * 256 * 64
    assert matmul_params(spec) == 2 * per_layer + 128 * 64
    flops, nbytes = decode_cost(spec, context=10)
    assert flops == 2 * matmul_params(spec) + 2 * 4 * 4 * 16 * 10
    assert nbytes == 4 * matmul_params(spec) + 10 * spec.kv_cache_bytes_per_token("float32")
    slow_memory = Machine(matmul_gflops=1e6, memory_gbps=1.0)
    assert arithmetic_ms(spec, 10, slow_memory) == pytest.approx(1e3 * nbytes / 1e9)


def test_parse_llama_bench():
    out = json.dumps([{"n_prompt": 0, "n_gen": 64, "avg_ts": 1500.5}])
    assert parse_llama_bench(out) == 1500.5
    assert llama_bench_command("lb", "m.gguf", 2) == ["lb", "-m", "m.gguf", "-p", "0", "-n", "64", "-t", "2",
                                                      "-o", "json"]
    with pytest.raises(ExportError, match="no decode"):
        parse_llama_bench(json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 9.0}]))
    with pytest.raises(ExportError, match="not llama-bench JSON"):
        parse_llama_bench("build: 1234")


def test_bench_reports_overhead_beside_tokens_per_s(hetero_ckpt):
    from export.runtime.bench import bench_decode, format_table

    rep = bench_decode(hetero_ckpt, [1], prompt_len=6, batches=(1, 2), steps=2, repeats=2,
                       runtimes=("torch", "torch-fast"))
    rows = rep["results"]
    assert [r["runtime"] for r in rows] == ["torch", "torch-fast"] and rep["repeats"] == 2
    for r in rows:
        assert r["decode_b1_ms_per_token"] == pytest.approx(1e3 / r["decode_b1_tokens_per_s"])
        assert r["overhead_ms_per_token"] == pytest.approx(r["decode_b1_ms_per_token"] - r["arithmetic_ms_per_token"])
    roof = rep["roofline"]
    assert roof["matmul_gflops"] > 0 and roof["memory_gbps"] > 0 and len(rep["load_average"]) == 3
    text = format_table(rep)
    assert "overhead ms/tok" in text and "roofline:" in text and "load average:" in text


def _fake_llama_bench(tmp_path, rate: float):
    script = tmp_path / "llama-bench"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"assert sys.argv[1:3] == ['-m', sys.argv[2]] and '-o' in sys.argv\n"
                      f"print(json.dumps([{{'n_prompt': 0, 'n_gen': 64, 'avg_ts': {rate}}}]))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return script, gguf


@pytest.mark.slow
def test_bench_runs_llama_bench_in_the_same_run(tmp_path, hetero_ckpt):
    from export.runtime.bench import bench_decode, format_table

    script, gguf = _fake_llama_bench(tmp_path, 1000.0)
    assert run_llama_bench(script, gguf, threads=1) == 1000.0
    rep = bench_decode(hetero_ckpt, [1], prompt_len=4, batches=(1,), steps=2, repeats=1,
                       runtimes=("torch-fast",), llama_cpp=(script, gguf))
    row = rep["results"][0]
    assert rep["llama_cpp_decode_tokens_per_s"] == 1000.0
    assert row["vs_llama_cpp_b1"] == pytest.approx(row["decode_b1_tokens_per_s"] / 1000.0)
    assert "llama.cpp (llama-bench tg64): 1000.0 tok/s" in format_table(rep)


def test_against_llama_cpp_needs_gguf_and_a_binary(tmp_path, capsys, hetero_ckpt):
    from export.cli import main

    assert main(["bench", "decode", str(hetero_ckpt), "--against-llama-cpp", str(tmp_path / "lb")]) == 2
    assert "--gguf" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no such file"):
        run_llama_bench(tmp_path / "missing", tmp_path / "m.gguf", threads=1)

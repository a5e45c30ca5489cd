"""build: the exact trtllm-build argument list, and the honest 'not built' path on this host."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.cli import main
from export.manifest import Manifest
from export.trtllm.build import has_engine_path, missing_requirements, trtllm_build_args
from export.trtllm.convert import convert
from tests.conftest import llama_spec
from tests.trtllm_helpers import make_source


def test_argument_list():
    args = trtllm_build_args(Path("engines/m/checkpoint"), Path("engines/m/trtllm"), workers=4, max_batch_size=8,
                             max_input_len=1024, max_seq_len=2048, max_num_tokens=8192)
    assert args == ["trtllm-build", "--checkpoint_dir", "engines/m/checkpoint", "--output_dir", "engines/m/trtllm",
                    "--gemm_plugin", "auto", "--kv_cache_type", "paged", "--max_batch_size", "8",
                    "--max_input_len", "1024", "--max_seq_len", "2048", "--max_num_tokens", "8192", "--workers", "4"]
    assert all(isinstance(a, str) for a in args)


def test_engine_path_versions():
    assert has_engine_path("1.2.1") and has_engine_path("0.14.0") and has_engine_path("1.3.0rc20")
    assert not has_engine_path("1.3.0") and not has_engine_path("1.4.0rc1")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("b")
    return convert(make_source(root / "s", llama_spec()), root / "e", tp=2, progress=False).out


def _build(capsys, engine, *flags):
    """`python -m export build` in-process (the CLI entry point, minus interpreter start-up)."""
    code = main(["build", str(engine), *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_absent_trtllm_says_what_is_missing_and_what_works(engine, capsys):
    missing = missing_requirements()
    if not missing:
        pytest.fail("this host has TensorRT-LLM and a GPU: run the real build instead of this test")
    before = (engine / "manifest.json").read_text()
    code, out, err = _build(capsys, engine, "--max-batch-size", "4")
    assert code == 0, err
    assert "TensorRT-LLM engine NOT built" in out and "tensorrt_llm" in out
    assert "Still works: the CPU engine" in out
    assert not (engine / "trtllm").exists() and (engine / "manifest.json").read_text() == before
    assert "trtllm" not in Manifest.load(engine).engines
    code, out, err = _build(capsys, engine, "--require-trtllm")
    assert code == 2 and "NOT built" in err and not (engine / "trtllm").exists()


def test_build_without_manifest_is_clear(tmp_path, capsys):
    code, _, err = _build(capsys, tmp_path)
    assert code == 2 and "no manifest.json" in err


@pytest.mark.slow
def test_bench_measure_machinery_on_a_tiny_model(tmp_path):
    """The benchmark's copy/convert children on a tiny source: both report time, bytes and peak RSS."""
    from export.trtllm.bench import format_report, measure
    src = make_source(tmp_path / "s", llama_spec())
    row = measure(src, tmp_path / "work", tp=2)
    assert row["copy"]["bytes_written"] == row["source_bytes"]
    assert row["convert"]["bytes_read"] > 0 and row["convert"]["peak_rss_bytes"] > row["copy"]["peak_rss_bytes"]
    assert row["ratio"] > 0 and not (tmp_path / "work" / "s-convert").exists()
    # the split embedding is written once, not tp times: (tp - 1) copies fewer, zero padding aside
    assert row["written_bytes_saved_pe"] == 128 * 64 * 4 * (2 - 1) and row["ratio_pe"] > 0
    rep = {"tp": 2, "sizes": [row], "peak_rss_growth_bytes": 0, "min_ratio": row["ratio"],
           "min_ratio_pe": row["ratio_pe"], "min_written_ratio": row["written_ratio"], "target_ratio": 0.7}
    text = format_report(rep)
    assert "convert --tp 2 vs plain copy" in text and "--parallel-embedding (split)" in text

"""`python -m export inspect` on the real Ultra-253B config, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_spec import ULTRA

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "export", "inspect", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_ultra_tp8_figures():
    out = run(str(ULTRA), "--tp", "8")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "162: 64 attention, 81 FFN, 81 empty" in text
    assert "(253.4B)" in text
    assert "layer 125: 399360, layer 134: 425984, layer 143: 343040, layer 149: 301056" in text
    assert "sync points per token    146" in text
    assert "divisibility             ok" in text
    assert "9-12           4  empty" in text  # runs of identical layers are compressed


@pytest.mark.slow
def test_ultra_json_per_rank_bytes():
    rep = json.loads(run(str(ULTRA), "--tp", "8", "--json").stdout)
    assert rep["parameters"] == 253_401_268_224
    assert rep["kv_cache_bytes_per_token"] == 64 * 2 * 8 * 128 * 2
    sizes = rep["rank_weight_bytes"]
    assert len(sizes) == 8 and len(set(sizes)) == 1
    # every rank: all matrices / 8, except the embedding and the norms, which each rank holds whole
    embed = 128256 * 16384 * 2
    norms = (64 + 81 + 1) * 16384 * 2
    assert sizes[0] == (rep["parameters"] * 2 - embed - norms) // 8 + embed + norms


@pytest.mark.slow
def test_bad_tp_names_the_problem_and_fails():
    out = run(str(ULTRA), "--tp", "3")
    assert out.returncode == 2
    assert "tp=3 does not divide num_attention_heads=128" in out.stdout


@pytest.mark.slow
def test_missing_config_is_a_clear_error(tmp_path):
    out = run(str(tmp_path))
    assert out.returncode == 2 and "no config.json found" in out.stderr

"""The ONNX graph: structure (KV only for attention layers, one gate/up and one down MatMul per FFN,
dynamic axes, external weights), the checker, `build --onnx` and the manifest, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import hetero_spec

from export.errors import ExportError
from export.io.output import MARKER
from export.onnx.export import build_onnx, export_onnx
from export.onnx.graph import DATA_FILE, MODEL_FILE, OPSET
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingParams
from export.spec import FFNKind
from export.synthetic import write_random_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """Random hetero checkpoint (every layer kind) and its ONNX export."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hetero")
    write_random_checkpoint(root / "hf", hetero_spec(), seed=3, std=0.2)
    res = export_onnx(root / "hf", root / "onnx", progress=False)
    return root, res


def _graph(onnx_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(onnx_dir / MODEL_FILE), load_external_data=False)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_checker_passes_and_the_opset_is_17(hetero):
    root, _ = hetero
    onnx.checker.check_model(str(root / "onnx" / MODEL_FILE), full_check=True)
    model = _graph(root / "onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]


def test_kv_inputs_and_outputs_only_for_attention_layers_with_dynamic_axes(hetero):
    root, res = hetero
    spec = res.spec
    model = _graph(root / "onnx")
    attn = spec.attention_layers()
    assert attn == [0, 1, 5]  # layers 2-4 are FFN-only, 6 linear, 7 empty: no cache for them
    inputs = {i.name: _dims(i) for i in model.graph.input}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert set(inputs) == {"input_ids", "position_ids", "attention_mask"} | {
        f"past_key_values.{i}.{kv}" for i in attn for kv in ("key", "value")}
    assert set(outputs) == {"logits"} | {f"present.{i}.{kv}" for i in attn for kv in ("key", "value")}
    assert inputs["input_ids"] == ["batch", "seq"] and inputs["attention_mask"] == ["batch", "total_seq"]
    for i in attn:
        kv = spec.layers[i].attention.kv_heads
        assert inputs[f"past_key_values.{i}.key"] == ["batch", kv, "past_seq", spec.head_dim]
        assert outputs[f"present.{i}.value"] == ["batch", kv, "total_seq", spec.head_dim]
    assert outputs["logits"] == ["batch", "seq", spec.vocab]


def test_each_ffn_is_one_gate_up_and_one_down_matmul(hetero):
    root, res = hetero
    spec, model = res.spec, _graph(root / "onnx")
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for i, lay in enumerate(spec.layers):
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].startswith(f"layers.{i}.ffn.")]
        if lay.ffn.kind is FFNKind.SWIGLU:
            assert [n.input[1] for n in matmuls] == [f"layers.{i}.ffn.gate_up", f"layers.{i}.ffn.down"]
            assert shapes[f"layers.{i}.ffn.gate_up"] == [spec.hidden, 2 * lay.ffn.width]
            assert shapes[f"layers.{i}.ffn.down"] == [lay.ffn.width, spec.hidden]
        else:
            assert len(matmuls) == (1 if lay.ffn.kind is FFNKind.LINEAR else 0)
    # layer 7 is empty: no node at all in its scope; FFN-only layers have no attention nodes
    assert not [n for n in model.graph.node if n.name.startswith("layers.7/")]
    assert not [n for n in model.graph.node if n.input and any(x.startswith("layers.3.attn") for x in n.input)]


def test_weights_are_external_data_in_one_file(hetero):
    root, res = hetero
    model = _graph(root / "onnx")
    big = [t for t in model.graph.initializer if not t.name.startswith("const_")]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {DATA_FILE}
    assert (root / "onnx" / MODEL_FILE).stat().st_size < 200_000  # the graph alone; weights are beside it
    assert (root / "onnx" / DATA_FILE).stat().st_size >= res.weight_bytes
    # config.json beside the graph describes it (fp32)
    assert json.loads((root / "onnx" / "config.json").read_text())["torch_dtype"] == "float32"


def test_hetero_parity_with_the_reference_runtime(hetero):
    """Linear replacements, an empty block, GQA with 1/2/4 kv heads: logits and greedy tokens match."""
    root, _ = hetero
    seqs = [[1, 5, 7, 9, 11, 3, 40], [4, 2, 8]]
    with Engine.start(root / "hf") as ref, Engine.start(root / "onnx", runtime="onnx") as ort:
        diff = (ref.logits(seqs) - ort.logits(seqs)).abs().max().item()
        assert diff <= 1e-4
        params = SamplingParams(max_tokens=12)
        assert ort.generate(seqs, params) == ref.generate(seqs, params)
        assert ort.stats()[0]["kv_bytes_per_token"] == ref.stats()[0]["kv_bytes_per_token"]


@pytest.mark.slow
def test_build_onnx_cli_records_the_engine_in_the_manifest(tmp_path):
    from triton_support import make_engine_dir

    engine_dir = make_engine_dir(tmp_path, tp=1)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "export", "build", str(engine_dir), "--onnx", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "onnx.checker passed" in proc.stdout and "trtexec --onnx=" in proc.stdout
    entry = json.loads((engine_dir / "manifest.json").read_text())["engines"]["onnx"]
    assert entry["path"] == "onnx" and entry["opset"] == OPSET and entry["kv_layers"] == [0, 3]
    assert (engine_dir / "onnx" / MODEL_FILE).is_file()
    assert not [p for p in engine_dir.iterdir() if p.name.startswith(".") and p.name != MARKER]  # no temp dir left
    gen = subprocess.run([sys.executable, "-m", "export", "generate", str(engine_dir), "the quick", "--max-tokens", "6",
                          "--ignore-eos", "--runtime", "onnx", "--json"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    from export.runtime.text import generate_text

    ref = generate_text(engine_dir, "the quick", SamplingParams(max_tokens=6), stop_at_eos=False)
    assert json.loads(gen.stdout)["new_tokens"] == ref.new_tokens


@pytest.mark.slow
def test_a_split_engine_builds_from_its_source_or_says_why_not(tmp_path):
    from triton_support import make_engine_dir

    engine_dir = make_engine_dir(tmp_path, tp=2)
    res = build_onnx(engine_dir, progress=False)
    assert res.source == tmp_path / "hf"
    ids = [[5, 6, 7, 8]]
    with Engine.start(engine_dir) as ref, Engine.start(engine_dir / "checkpoint", runtime="onnx") as ort:
        assert ref.mapping.tp == 2
        assert np.allclose(ref.logits(ids), ort.logits(ids), atol=1e-4)
    (tmp_path / "hf").rename(tmp_path / "gone")
    with pytest.raises(ExportError, match="split for tp=2 pp=1 and the source checkpoint"):
        build_onnx(engine_dir, progress=False)


def test_refusals_name_the_problem(hetero, tmp_path):
    root, _ = hetero
    with pytest.raises(ExportError, match=r"tp=1, pp=1\); got tp=2"):
        Engine.start(root / "onnx", runtime="onnx", tp=2)
    with pytest.raises(ExportError, match="no ONNX graph"):
        Engine.start(root / "hf", runtime="onnx")
    with pytest.raises(ExportError, match="runtime must be one of"):
        Engine.start(root / "hf", runtime="tensorrt")
    with pytest.raises(ExportError, match="graph is float32"):
        Engine.start(root / "onnx", runtime="onnx", dtype="bf16")


def test_tensorrt_profile_covers_prefill_and_decode_and_runs_in_ort(hetero):
    """The printed trtexec profile names exactly the graph's inputs, and ORT runs its opt shapes."""
    from export.onnx.backend import make_session
    from export.onnx.tensorrt import profile_shapes, trtexec_command

    root, res = hetero
    shapes = profile_shapes(res.spec, max_batch=8, max_input_len=64, max_seq_len=128)
    model = _graph(root / "onnx")
    assert set(shapes) == {i.name for i in model.graph.input}
    assert shapes["past_key_values.5.key"] == ((1, 1, 0, 8), (4, 1, 64, 8), (8, 1, 127, 8))
    cmd = trtexec_command(root / "onnx" / MODEL_FILE, shapes, root / "model.plan")
    assert cmd[0] == "trtexec" and "past_key_values.0.value:1x2x0x8" in cmd[2]
    session = make_session(root / "onnx" / MODEL_FILE)
    feed = {name: np.zeros(s[1], dtype=np.float32 if name.startswith("past") else np.int64)
            for name, s in shapes.items()}
    feed["attention_mask"][:] = 1
    logits, *presents = session.run(None, feed)
    assert logits.shape == (4, 1, res.spec.vocab) and presents[0].shape == (4, 2, 65, 8)


def test_bench_decode_reports_both_runtimes(tmp_path):
    from triton_support import make_engine_dir

    from export.runtime.bench import bench_decode, format_table

    engine_dir = make_engine_dir(tmp_path, tp=1)
    build_onnx(engine_dir, progress=False)
    rep = bench_decode(engine_dir, [1], prompt_len=8, batches=(1, 2), steps=2, runtimes=("torch", "onnx"))
    rows = rep["results"]
    assert [(r["runtime"], r["tp"]) for r in rows] == [("torch", 1), ("onnx", 1)]
    assert rows[1]["decode_b2_tokens_per_s"] > 0 and rows[1]["sync_points_per_token"] == 0
    assert rows[1]["kv_cache_bytes_per_token"] == rows[0]["kv_cache_bytes_per_token"]
    assert rows[1]["decode_b1_vs_base"] == rows[1]["decode_b1_tokens_per_s"] / rows[0]["decode_b1_tokens_per_s"]
    assert "onnx" in format_table(rep)

"""The "onnx-fast" runtime (export/onnx/fast_graph.py + fast_backend.py) against the reference runtime:
logits step by step (<= 1e-4) on a heterogeneous model and the demo model, identical greedy tokens,
the graph it runs (contrib ops over the engine's own weights), the cache written in place, refusals."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

from export.errors import ExportError
from export.onnx.export import export_onnx
from export.onnx.fast_backend import OnnxFastBackend, start_onnx_fast
from export.onnx.fast_graph import FastDecoderGraph
from export.onnx.graph import MODEL_FILE
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingParams
from export.runtime.steps import Decode, Free, Logits, Prefill, Reserve
from export.spec import ModelSpec
from export.synthetic import write_random_checkpoint
from tests.conftest import hetero_spec

PUZZLE = "export/demo/models/puzzle"
TOL = 1e-4


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """(checkpoint, its ONNX engine): mixed kv heads, no-op and linear sublayers, an empty block."""
    root = tmp_path_factory.mktemp("fast-onnx")
    spec = dataclasses.replace(hetero_spec(), head_dim=16)  # GroupQueryAttention wants a multiple of 16
    ckpt = write_random_checkpoint(root / "ckpt", spec, seed=5, std=0.08)
    return ckpt, export_onnx(ckpt, root / "onnx", progress=False).out


@pytest.fixture(scope="module")
def puzzle_onnx(tmp_path_factory):
    return export_onnx(PUZZLE, tmp_path_factory.mktemp("puzzle") / "onnx", progress=False).out


def _steps(source, runtime: str) -> list[torch.Tensor]:
    """Ragged prefill, decode on contiguous slots, out of order, a subset with a gap, a slot joining
    late, a freed slot reused, and the cache-free Logits."""
    with Engine.start(source, runtime=runtime) as eng:
        call = eng.backend.call
        call(Reserve(4, 64))
        out = [call(Prefill((0, 1, 2), ((5, 6, 7, 8), (9, 10), (11, 12, 13, 14, 15))))[0]]
        out += [call(Decode((0, 1, 2), (s, s + 1, s + 2)))[0] for s in range(6)]
        out += [call(Decode((2, 0), (3, 4)))[0], call(Decode((1,), (7,)))[0], call(Decode((0, 2), (5, 6)))[0]]
        out += [call(Prefill((3,), ((1, 2, 3),)))[0], call(Decode((1, 3), (8, 9)))[0]]
        call(Free((1,)))
        out += [call(Prefill((1,), ((4, 4, 4, 4, 4, 4),)))[0], call(Decode((0, 1, 2, 3), (1, 2, 3, 4)))[0]]
        out += [call(Logits(((1, 2, 3, 4, 5), (6, 7))))[0]]
    return out


@pytest.mark.parametrize("which", ["hetero", "puzzle"])
def test_logits_match_the_reference_runtime(which, hetero, puzzle_onnx):
    ref_source, fast_source = hetero if which == "hetero" else (PUZZLE, puzzle_onnx)
    for ref, fast in zip(_steps(ref_source, "torch"), _steps(fast_source, "onnx-fast"), strict=True):
        assert ref.shape == fast.shape
        if ref.dim() == 3:  # Logits: row 1's right padding is unspecified, its 2 real tokens are compared
            ref, fast = torch.cat([ref[0], ref[1, :2]]), torch.cat([fast[0], fast[1, :2]])
        assert (ref - fast).abs().max() <= TOL


def test_parallel_blocks_run_as_the_engines_wide_ffn(tmp_path):
    from tests.test_puzzletron import checkpoint, parallel_config

    cfg = parallel_config()
    cfg["head_dim"] = 16
    par = checkpoint(tmp_path, cfg, name="par", seed=6)
    out = export_onnx(par, tmp_path / "onnx", progress=False).out
    seqs, params = [[1, 5, 7, 9], [4, 2]], SamplingParams(max_tokens=6)
    with Engine.start(par) as ref, Engine.start(out, runtime="onnx-fast") as fast:
        assert (ref.logits(seqs)[0] - fast.logits(seqs)[0]).abs().max().item() <= TOL
        assert ref.generate(seqs, params) == fast.generate(seqs, params)


def test_greedy_tokens_are_identical(puzzle_onnx):
    prompts = torch.randint(0, 4096, (3, 20), generator=torch.Generator().manual_seed(0)).tolist()
    prompts[1] = prompts[1][:7]
    params = SamplingParams(max_tokens=12)
    with Engine.start(PUZZLE) as ref, Engine.start(puzzle_onnx, runtime="onnx-fast") as fast:
        assert ref.generate(prompts, params) == fast.generate(prompts, params)


def test_the_graph_is_contrib_ops_over_the_engines_weights(hetero):
    _, onnx_dir = hetero
    spec = ModelSpec.load(onnx_dir)
    engine = onnx.load(str(onnx_dir / MODEL_FILE), load_external_data=False).graph
    model = FastDecoderGraph(spec, {t.name: t for t in engine.initializer}, "x").build()
    ops = [n.op_type for n in model.graph.node]
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == len(spec.attention_layers()) == 3 and "Concat" not in ops
    kv = {a.name: a.i for n in gqa for a in n.attribute if a.name == "kv_num_heads"}
    assert sorted(a.i for n in gqa for a in n.attribute if a.name == "kv_num_heads") == [1, 2, 4] and kv
    for n in gqa:  # past and present are the same buffer, named per layer
        assert n.input[3].replace("past_key_values", "present") == n.output[1]
    sublayers = sum(bool(a) for lay in spec.layers for a in (lay.attention.kind != "no_op", lay.ffn.kind != "no_op"))
    assert ops.count("SkipSimplifiedLayerNormalization") == sublayers  # every residual add but the embedding's
    weights = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in weights} == {t.name for t in engine.initializer if t.data_location == 1}


def test_the_cache_is_written_in_place_and_bindings_are_reused(hetero):
    _, onnx_dir = hetero
    _, _, backend = start_onnx_fast(onnx_dir, tp=1, pp=1, dtype="float32", threads=1)
    assert isinstance(backend, OnnxFastBackend)
    backend.run(Reserve(2, 16))
    backend.run(Prefill((0, 1), ((1, 2, 3), (4, 5))))
    layer = backend.spec.attention_layers()[0]
    keys = backend.cache.k[layer]
    assert keys[0, :, :3].abs().sum() > 0 and keys[0, :, 3:].abs().sum() == 0
    backend.run(Decode((0, 1), (6, 7)))
    bound = next(reversed(backend._bound.values()))
    backend.run(Decode((0, 1), (8, 9)))
    assert next(reversed(backend._bound.values())) is bound and backend.cache.k[layer] is keys
    assert keys[1, :, 3:4].abs().sum() > 0 and keys[1, :, 4:].abs().sum() == 0  # slot 1: 2 + 2 tokens
    assert backend.cache.lengths.tolist() == [5, 4]


def test_refusals_are_one_line(hetero, tmp_path):
    ckpt, onnx_dir = hetero
    with pytest.raises(ExportError, match=r"runtime 'onnx-fast' runs the whole model in one process .*tp=2"):
        Engine.start(onnx_dir, runtime="onnx-fast", tp=2)
    with pytest.raises(ExportError, match=r"runtime 'onnx-fast'.*dtype=bfloat16 is not available"):
        Engine.start(onnx_dir, runtime="onnx-fast", dtype="bfloat16")
    with pytest.raises(ExportError, match=r"no ONNX graph \(model.onnx\) here .*build engines/NAME --onnx"):
        Engine.start(ckpt, runtime="onnx-fast")
    _, _, backend = start_onnx_fast(onnx_dir, tp=1, pp=1, dtype="float32", threads=1)
    backend.run(Reserve(1, 300))
    backend.cache.lengths[0] = 256  # max_position_embeddings
    with pytest.raises(ExportError, match=r"a sequence of 257 tokens is beyond the model's max_position_embeddings"):
        backend.run(Decode((0,), (1,)))
    spec = ModelSpec.load(onnx_dir)
    engine = onnx.load(str(onnx_dir / MODEL_FILE), load_external_data=False).graph
    table = {t.name: t for t in engine.initializer if t.name != "layers.1.attn.o"}
    with pytest.raises(ExportError, match=r"m/model.onnx: initializer 'layers.1.attn.o' is missing") as e:
        FastDecoderGraph(spec, table, "m/model.onnx").build()
    assert "\n" not in str(e.value)
    narrower = ModelSpec.load(onnx_dir).with_layers(spec.layers[:1] + tuple(
        lay if i != 1 else type(lay)(type(lay.attention)(lay.attention.kind, 2), lay.ffn)
        for i, lay in enumerate(spec.layers) if i))
    with pytest.raises(ExportError, match=r"initializer 'layers.1.attn.qkv' is \[64, 256\], .* needs fp32 \[64, 192\]"):
        FastDecoderGraph(narrower, {t.name: t for t in engine.initializer}, "m/model.onnx").build()
    with pytest.raises(ExportError, match=r"m/model.onnx: head_dim 8 is not a multiple of 16, .*use runtime 'onnx'"):
        FastDecoderGraph(hetero_spec(), {}, "m/model.onnx").build()

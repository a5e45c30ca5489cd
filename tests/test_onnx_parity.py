"""ONNX Runtime vs the reference runtime on the shipped demo model, unfused and FFN-fused:
prefill and decode logits (fp32, <= 1e-4) step by step, with slots joining at different lengths,
and identical greedy generation."""

from __future__ import annotations

import onnx
import pytest
import torch

from export.demo.paths import DEMO_PUZZLE
from export.deployment_plan import attention_free_runs
from export.io.tokenizer import FastTokenizer as Tokenizer
from export.onnx.export import export_onnx
from export.onnx.graph import MODEL_FILE
from export.runtime.engine import Engine
from export.runtime.sampling import SamplingParams
from export.runtime.steps import Decode, Free, Prefill, Reserve
from export.spec import ModelSpec

TOL = 1e-4
PROMPTS = ["def main(argv):\n    return", "import os\nclass Path:\n    def __init__(self"]


def attention_free_run(spec: ModelSpec) -> list[int]:
    """The demo Puzzle model's one run of FFN-only blocks (where it lies is chosen by training)."""
    (run,) = attention_free_runs(spec)
    assert len(run) >= 4
    return run


@pytest.fixture(scope="module", params=["unfused", "fused"])
def engines(request, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    src = DEMO_PUZZLE
    if request.param == "fused":
        from export.fusion.fuse import fuse_checkpoint
        from export.fusion.plan import FusionPlan

        run = attention_free_run(ModelSpec.load(DEMO_PUZZLE))
        src = fuse_checkpoint(DEMO_PUZZLE, FusionPlan([(run[0], run[-1])]), root / "fused", progress=False).out
    res = export_onnx(src, root / "onnx", progress=False)
    with Engine.start(src) as ref, Engine.start(root / "onnx", runtime="onnx") as ort:
        yield request.param, res, ref, ort


def _both(ref: Engine, ort: Engine, cmd) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.backend.call(cmd)[0], ort.backend.call(cmd)[0]


def test_the_fused_ffn_is_one_wide_gate_up_and_down(engines):
    kind, res, _, _ = engines
    spec = res.spec
    model = onnx.load(str(res.out / MODEL_FILE), load_external_data=False)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    if kind == "fused":
        unfused = ModelSpec.load(DEMO_PUZZLE)
        run = attention_free_run(unfused)
        first = run[0]
        assert spec.num_layers == unfused.num_layers - len(run) + 1  # the run's FFN-only layers became one
        assert spec.layers[first].ffn.width == sum(unfused.layers[i].ffn.width for i in run)
        width = spec.layers[first].ffn.width
        pre = f"layers.{first}.ffn."
        assert shapes[pre + "gate_up"] == [spec.hidden, 2 * width]
        assert [n.input[1] for n in model.graph.node if n.input[1:2] and n.input[1].startswith(pre)] == [
            pre + "gate_up", pre + "down"]
    past = {i.name for i in model.graph.input if i.name.startswith("past_key_values")}
    assert len(past) == 2 * len(spec.attention_layers()) == 16  # 8 attention layers either way


def test_prefill_and_decode_logits_match_step_by_step(engines):
    _, _, ref, ort = engines
    a, b = (Tokenizer(DEMO_PUZZLE).encode(p) for p in PROMPTS)
    assert len(a) != len(b)
    for eng in (ref, ort):
        eng.backend.call(Reserve(2, 64))
        eng.backend.call(Free((0, 1)))
    worst = 0.0
    x, y = _both(ref, ort, Prefill((0,), (tuple(a),)))
    worst = max(worst, (x - y).abs().max().item())
    tok0 = int(x.argmax())
    for _ in range(3):  # slot 0 decodes alone
        x, y = _both(ref, ort, Decode((0,), (tok0,)))
        worst = max(worst, (x - y).abs().max().item())
        tok0 = int(x.argmax())
    x, y = _both(ref, ort, Prefill((1,), (tuple(b),)))  # slot 1 joins, at another length
    worst = max(worst, (x - y).abs().max().item())
    tok1 = int(x.argmax())
    for _ in range(4):  # both decode together, their pasts of different lengths
        x, y = _both(ref, ort, Decode((0, 1), (tok0, tok1)))
        worst = max(worst, (x - y).abs().max().item())
        tok0, tok1 = (int(t) for t in x.argmax(-1))
    for eng in (ref, ort):
        eng.backend.call(Free((0, 1)))
    assert worst <= TOL, worst


def test_greedy_generation_is_identical(engines):
    _, _, ref, ort = engines
    prompts = [[1, 17, 90, 245, 12, 7, 300, 1024, 5], [1, 33, 2000]]
    params = SamplingParams(max_tokens=24)
    out = ort.generate(prompts, params)
    assert out == ref.generate(prompts, params)
    assert len(out[0]) == 24
    assert (ref.logits(prompts) - ort.logits(prompts)).abs().max().item() <= TOL

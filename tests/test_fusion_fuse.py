"""Fused checkpoints: Theorem 3.1 checked against the parallel-sum form computed here in plain torch
from the original weights, for both norm modes and unequal widths; layout, streaming, CLI."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from export.cli import main
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import FusionPlan, PlanError
from export.io.reader import CheckpointReader
from export.spec import ModelSpec, ffn_mult_to_width
from export.synthetic import write_random_checkpoint
from tests.conftest import EMPTY, ROPE, attn_only, ffn_only, full, write_tokenizer

EPS = 1e-5


def fusion_spec(dtype: str = "float32") -> ModelSpec:
    """A run of unequal-width FFN-only blocks with an empty block inside, then a second run."""
    layers = (full(2, 256), ffn_only(256), EMPTY, ffn_only(768), ffn_only(2048), ffn_only(512),
              attn_only(1), ffn_only(256), ffn_only(512), full(4, 512))
    return ModelSpec(hidden=64, heads=8, head_dim=8, vocab=99, layers=layers, rope_scaling=ROPE,
                     norm_eps=EPS, dtype=dtype, passthrough={"bos_token_id": 1, "eos_token_id": 2})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("src") / "m", fusion_spec(), seed=7)
    write_tokenizer(path)
    return path


def rms(x, scale):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * scale


def ffn(x, w, layer):
    p = f"model.layers.{layer}."
    return (F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)) \
        @ w[p + "mlp.down_proj.weight"].T


def block(x, w, layer):
    """An attention-free DeciLM block: x + FFN(post_attention_layernorm(x))."""
    return x + ffn(rms(x, w[f"model.layers.{layer}.post_attention_layernorm.weight"]), w, layer)


def weights(path):
    r = CheckpointReader(path)
    return {n: r.get(n) for n in r.names()}


@pytest.mark.parametrize("norm", ["fold", "last"])
@pytest.mark.parametrize("group", [(1, 4), (3, 5)])
def test_fused_block_equals_parallel_sum(source, tmp_path, norm, group):
    out = tmp_path / "fused"
    res = fuse_checkpoint(source, FusionPlan([group]), out, norm=norm, progress=False)
    w0, w1 = weights(source), weights(out)
    members = [i for i in range(group[0], group[1] + 1) if i != 2]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    own = {"fold": lambda j: w0[f"model.layers.{j}.post_attention_layernorm.weight"],
           "last": lambda j: w0[f"model.layers.{members[-1]}.post_attention_layernorm.weight"]}[norm]
    expected = x + sum(ffn(rms(x, own(j)), w0, j) for j in members)
    new = res.layer_map[group[0]]
    got = block(x, w1, new)
    assert (got - expected).abs().max().item() <= 1e-5
    if norm == "fold":
        assert torch.equal(w1[f"model.layers.{new}.post_attention_layernorm.weight"], torch.ones(64))
    assert res.after.layers[new].ffn.width == sum(fusion_spec().layers[j].ffn.width for j in members)


def test_layout_copies_untouched_tensors_exactly_and_drops_fused_blocks(source, tmp_path):
    res = fuse_checkpoint(source, FusionPlan([(1, 4), (7, 8)]), tmp_path / "f", progress=False)
    assert res.after.num_layers == 10 - 3 - 1  # [1,4] (with empty 2) -> 1 block, [7,8] -> 1 block
    assert res.layer_map == {0: 0, 1: 1, 2: None, 3: None, 4: None, 5: 2, 6: 3, 7: 4, 8: None, 9: 5}
    w0, w1 = weights(source), weights(tmp_path / "f")
    for old, new in res.layer_map.items():
        if new is not None and old not in (1, 7):
            for name in [n for n in w0 if n.startswith(f"model.layers.{old}.")]:
                assert torch.equal(w1[name.replace(f".{old}.", f".{new}.")], w0[name]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(w1[name], w0[name])
    assert res.before.sync_points_per_token() - res.after.sync_points_per_token() == 2 + 1
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    fused = cfg["block_configs"][1]
    assert fused["attention"]["no_op"] is True
    assert ffn_mult_to_width(fused["ffn"]["ffn_mult"], 64) == 256 + 768 + 2048
    assert cfg["eos_token_id"] == 2 and cfg["num_hidden_layers"] == 6
    assert (tmp_path / "f" / "tokenizer.json").is_file()
    record = json.loads((tmp_path / "f" / "fusion_plan.json").read_text())
    assert record["norm"] == "fold" and record["plan"]["groups"] == [[1, 4], [7, 8]]
    spec = ModelSpec.load(tmp_path / "f")
    CheckpointReader(tmp_path / "f").validate(spec)


def test_keep_layer_count_leaves_empty_blocks(source, tmp_path):
    res = fuse_checkpoint(source, FusionPlan([(3, 5)]), tmp_path / "k", keep_layer_count=True, progress=False)
    spec = ModelSpec.load(tmp_path / "k")
    assert spec.num_layers == 10
    assert [spec.layers[i].is_empty for i in (3, 4, 5)] == [False, True, True]
    assert spec.layers[3].ffn.width == 768 + 2048 + 512 and not spec.layers[3].has_attention
    assert res.layer_map[6] == 6
    CheckpointReader(tmp_path / "k").validate(spec)


def test_streams_in_row_chunks_and_shards(source, tmp_path, monkeypatch):
    """Tiny chunks and shards: the fused tensors are assembled from many row slices across files."""
    monkeypatch.setattr("export.fusion.fuse.CHUNK_BYTES", 1000)
    res = fuse_checkpoint(source, FusionPlan([(1, 4)]), tmp_path / "s", norm="last", max_shard_bytes=200_000,
                          progress=False)
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 2
    ref = fuse_checkpoint(source, FusionPlan([(1, 4)]), tmp_path / "r", norm="last", progress=False)
    a, b = weights(res.out), weights(ref.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_fold_is_computed_in_fp32(tmp_path):
    src = write_random_checkpoint(tmp_path / "b", fusion_spec("bfloat16"), seed=3)
    fuse_checkpoint(src, FusionPlan([(3, 5)]), tmp_path / "bf", progress=False)
    w0, w1 = weights(src), weights(tmp_path / "bf")
    gate = w1["model.layers.3.mlp.gate_proj.weight"]
    assert gate.dtype == torch.bfloat16
    s = w0["model.layers.3.post_attention_layernorm.weight"].float()
    assert torch.equal(gate[:768], (w0["model.layers.3.mlp.gate_proj.weight"].float() * s).bfloat16())


def test_bad_plan_writes_nothing(source, tmp_path):
    with pytest.raises(PlanError, match=r"group 0 \(\[0, 1\]\): layer 0 has attention"):
        fuse_checkpoint(source, FusionPlan([(0, 1)]), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_cli_plan_then_fuse(source, tmp_path, capsys):
    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    plan = tmp_path / "plan.json"
    r = run("plan", str(source), "--out", str(plan), "--max-width", "1024")
    assert r.returncode == 0, r.stderr
    assert "group [1, 3]: 2 FFNs [256, 768] -> width 1024" in r.stdout
    r = run("fuse", str(source), "--plan", str(plan), "--out", str(tmp_path / "o"), "--norm", "last")
    assert r.returncode == 0, r.stderr
    assert "layers 10 -> 8" in r.stdout and "sync points per token" in r.stdout
    plan.write_text(json.dumps({"groups": [[5, 7]]}))
    r = run("fuse", str(source), "--plan", str(plan), "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "group 0 ([5, 7]): layer 6 has attention (A1/-)" in r.stderr


def test_row_writes_must_cover_each_tensor_once(tmp_path):
    from export.io.safetensors_format import SafetensorsWriter

    w = SafetensorsWriter(tmp_path / "a.safetensors", [("t", torch.float32, (4, 2))])
    w.write_rows("t", 2, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"rows \[1, 3\) written twice"):
        w.write_rows("t", 1, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="do not fit"):
        w.write_rows("t", 2, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="1 planned tensors never written"):
        w.close()


@pytest.mark.parametrize("keep", [False, True])
def test_whole_fused_model_in_runtime_equals_parallel_form_of_original(tmp_path, keep):
    """Through the runtime Decoder: the fused checkpoint's logits equal the original model run with
    each group's blocks applied in parallel to the same input (fold mode)."""
    from export.mapping import Mapping
    from export.rank_weights import HFRankWeights
    from export.runtime.model import load_decoder

    spec = fusion_spec()
    src = write_random_checkpoint(tmp_path / "src", spec, seed=11, std=0.08)
    groups = [(1, 4), (7, 8)]
    res = fuse_checkpoint(src, FusionPlan(groups), tmp_path / "f", keep_layer_count=keep, progress=False)
    orig = load_decoder(HFRankWeights(CheckpointReader(src), spec, Mapping(), 0))
    fused = load_decoder(HFRankWeights(CheckpointReader(res.out), res.after, Mapping(), 0))
    ids = torch.randint(0, spec.vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    owner = {i: g for g in groups for i in range(g[0], g[1] + 1)}
    with torch.inference_mode():
        h = orig.embed(ids)
        for i in range(spec.num_layers):
            if i not in owner:
                h = orig.block(i, h)
            elif i == owner[i][0]:
                h = h + sum(orig.block(j, h) - h for j in range(owner[i][0], owner[i][1] + 1))
        expected = orig.head(h)
        got = fused(ids)
        sequential = orig(ids)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - sequential).abs().max().item() > 1e-3  # fusion is an approximation of the sequential model
    assert res.after.num_layers == (10 if keep else 6)


def test_fused_card_is_its_own_and_the_source_card_is_kept(source, tmp_path):
    from export.card import card_facts

    card = "---\nattention_removed: 1,2\nheldout_ppl: 12.0\n---\n\n# the source\n"
    src = tmp_path / "src"
    shutil.copytree(source, src)
    (src / "README.md").write_text(card)
    res = fuse_checkpoint(src, FusionPlan([(1, 4)]), tmp_path / "f", progress=False)
    facts = card_facts(tmp_path / "f")
    assert "attention_removed" not in facts and "heldout_ppl" not in facts
    assert facts["fusion_groups"] == "1-4" and facts["fused_widths"] == str(256 + 768 + 2048)
    assert (facts["sync_points_per_token_before"], facts["sync_points_per_token_after"]) == (
        str(res.before.sync_points_per_token()), str(res.after.sync_points_per_token()))
    assert (tmp_path / "f" / "README.source.md").read_text() == card


def test_fold_in_bf16_rounds_once_and_fp32_output_keeps_it_exact(tmp_path):
    """Folding s_j into gate/up is exact in fp32 (a bf16 x bf16 product fits in fp32's mantissa);
    stored as bf16 each product is rounded once."""
    src = write_random_checkpoint(tmp_path / "bf16", fusion_spec("bfloat16"), seed=3)
    w0 = weights(src)
    for dtype, exact in (("float32", True), (None, False)):
        res = fuse_checkpoint(src, FusionPlan([(3, 5)]), tmp_path / f"f{dtype}", progress=False, dtype=dtype)
        w1 = weights(tmp_path / f"f{dtype}")
        new = res.layer_map[3]
        want = torch.cat([w0[f"model.layers.{j}.mlp.gate_proj.weight"].float()
                          * w0[f"model.layers.{j}.post_attention_layernorm.weight"].float() for j in (3, 4, 5)])
        got = w1[f"model.layers.{new}.mlp.gate_proj.weight"]
        assert got.dtype == (torch.float32 if exact else torch.bfloat16)
        assert torch.equal(got.float(), want) is exact
        rel = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert rel <= (0 if exact else 2 ** -8)
        assert torch.equal(w1["model.embed_tokens.weight"].float(), w0["model.embed_tokens.weight"].float())
    assert ModelSpec.load(tmp_path / "ffloat32").dtype == "float32"

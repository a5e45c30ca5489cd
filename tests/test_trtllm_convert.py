"""convert: rank files against the TRT-LLM contract, reassembly, completeness, streaming, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.errors import CheckpointError, ExportError
from export.io.reader import CheckpointReader
from export.manifest import Manifest, tree_sha256
from export.mapping import Mapping
from export.sharding import padded_vocab
from export.spec import AttentionKind
from export.trtllm import names
from export.trtllm.convert import convert
from export.trtllm.rank_layout import check_complete, plan_checkpoint
from tests.conftest import hetero_spec, llama_spec
from tests.oracles import expected_shapes
from tests.trtllm_helpers import make_source, rank_tensors, read_all

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [(1, 1), (2, 1), (4, 1), (2, 2)]
DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_source(tmp_path_factory.mktemp("src") / "hetero", hetero_spec())


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("engines")
    # tp 4 and pp 2 stream in tiny row windows (many per tensor), the others a tensor at a time
    return {(tp, pp): convert(source, root / f"tp{tp}pp{pp}", tp=tp, pp=pp, progress=False,
                              window_bytes=1000 if tp * pp == 4 else 1 << 30).out
            for tp, pp in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_files_match_contract(converted, layout):
    tp, pp = layout
    spec, mapping = hetero_spec(), Mapping(tp, pp)
    ckpt = converted[layout] / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"] + [f"rank{r}.safetensors"
                                                                        for r in range(tp * pp)]
    for rank in mapping.ranks():
        tensors = rank_tensors(ckpt, rank)
        want = expected_shapes(spec, mapping, rank)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == want
        assert {v.dtype for v in tensors.values()} == {torch.float32}
    # no tensors at all for no-op sublayers: layer 7 is empty, layers 2-4 have no attention
    r0 = rank_tensors(ckpt, 0)
    per_stage = 8 // pp
    for g in range(per_stage):
        lay = spec.layers[g]
        has = {k.split(".", 3)[3] for k in r0 if k.startswith(f"transformer.layers.{g}.")}
        assert ("input_layernorm.weight" in has) == lay.has_attention
        assert ("post_layernorm.weight" in has) == lay.has_ffn
    if pp == 2:  # local indices restart at 0 on the second stage; embedding first, head last
        last = rank_tensors(ckpt, tp)
        assert "transformer.layers.0.attention.qkv.weight" not in last  # global layer 4 has no attention
        assert "transformer.layers.1.attention.qkv.weight" in last  # global layer 5 (attn_only, kv=1)
        assert "transformer.vocab_embedding.weight" in r0 and "lm_head.weight" not in r0
        assert "lm_head.weight" in last and "transformer.vocab_embedding.weight" not in last


@pytest.mark.parametrize("layout", LAYOUTS)
def test_config_json(converted, layout):
    tp, pp = layout
    cfg = json.loads((converted[layout] / "checkpoint" / "config.json").read_text())
    assert cfg["architecture"] == "DeciLMForCausalLM" and cfg["hidden_act"] == "silu"
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["rotary_base"] == 10000.0
    assert cfg["rotary_scaling"]["type"] == cfg["rotary_scaling"]["rope_type"] == "llama3"
    assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert cfg["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert cfg["dtype"] == "float32" and cfg["vocab_size"] == 99 and cfg["head_size"] == 8
    assert cfg["max_position_embeddings"] == 256 and cfg["num_hidden_layers"] == 8
    lcs = cfg["layer_configs"]
    assert len(lcs) == 8
    for lc in lcs:
        assert set(lc) == {"attention", "ffn"}
        assert set(lc["attention"]) == {"impl", "num_key_value_heads"}
        assert set(lc["ffn"]) == {"impl", "intermediate_size"}
    assert lcs[4] == {"attention": {"impl": "no_op", "num_key_value_heads": None},
                      "ffn": {"impl": "mlp", "intermediate_size": 2048}}
    assert lcs[6] == {"attention": {"impl": "linear", "num_key_value_heads": None},
                      "ffn": {"impl": "linear", "intermediate_size": None}}


def _reassemble(ckpt: Path, spec, mapping: Mapping) -> dict[str, torch.Tensor]:
    """Undo TRT-LLM's split, independently of export.sharding: HF name -> full tensor."""
    tp, hd = mapping.tp, spec.head_dim
    out: dict[str, torch.Tensor] = {}
    for stage in range(mapping.pp):
        ranks = [rank_tensors(ckpt, mapping.rank(t, stage)) for t in range(tp)]
        layers = mapping.pp_layers(spec.num_layers, stage)
        for i, g in enumerate(layers):
            pre, hf = f"transformer.layers.{i}.", f"model.layers.{g}."
            lay = spec.layers[g]
            cat = {"attention.dense": ("self_attn.o_proj", 1), "attention": ("self_attn.linear_attn", 0),
                   "ffn.fc": ("mlp.gate_proj", 0), "ffn.gate": ("mlp.up_proj", 0), "ffn.proj": ("mlp.down_proj", 1),
                   "ffn": ("mlp.linear_mlp", 0)}
            for trt, (name, dim) in cat.items():
                if pre + trt + ".weight" in ranks[0]:
                    out[hf + name + ".weight"] = torch.cat([r[pre + trt + ".weight"] for r in ranks], dim)
            for trt, name in (("input_layernorm", "input_layernorm"), ("post_layernorm", "post_attention_layernorm")):
                if pre + trt + ".weight" in ranks[0]:
                    assert all(torch.equal(r[pre + trt + ".weight"], ranks[0][pre + trt + ".weight"]) for r in ranks)
                    out[hf + name + ".weight"] = ranks[0][pre + trt + ".weight"]
            if lay.attention.kind is AttentionKind.FULL:
                kv = lay.attention.kv_heads
                q_rows, kv_rows = spec.heads // tp * hd, max(kv // tp, 1) * hd
                parts = [r[pre + "attention.qkv.weight"].split([q_rows, kv_rows, kv_rows]) for r in ranks]
                step = max(tp // kv, 1)  # duplicated kv heads: every (tp // kv)-th rank holds a distinct one
                out[hf + "self_attn.q_proj.weight"] = torch.cat([p[0] for p in parts])
                out[hf + "self_attn.k_proj.weight"] = torch.cat([p[1] for p in parts[::step]])
                out[hf + "self_attn.v_proj.weight"] = torch.cat([p[2] for p in parts[::step]])
                for t in range(tp):  # the duplicates are exact copies
                    assert torch.equal(parts[t][1], parts[t - t % step][1])
        if stage == 0:
            out["model.embed_tokens.weight"] = ranks[0]["transformer.vocab_embedding.weight"]
        if stage == mapping.pp - 1:
            out["model.norm.weight"] = ranks[0]["transformer.ln_f.weight"]
            head = torch.cat([r["lm_head.weight"] for r in ranks])
            assert head.shape[0] == padded_vocab(spec.vocab, tp) and not head[spec.vocab:].any()
            out["lm_head.weight"] = head[:spec.vocab]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reassembled_pieces_equal_source(converted, source, layout):
    spec = hetero_spec()
    full = read_all(source)
    back = _reassemble(converted[layout] / "checkpoint", spec, Mapping(*layout))
    assert set(back) == set(full)
    for name, t in full.items():
        assert torch.equal(back[name], t), name


def test_manifest_and_tokenizer(converted, source):
    eng = converted[(2, 2)]
    m = Manifest.load(eng)
    assert (m.tp, m.pp, m.dtype, m.checkpoint, m.tokenizer) == (2, 2, "float32", "checkpoint", "tokenizer")
    assert m.source_path == str(source.resolve()) and len(m.source_sha256) == 64
    assert m.engines == {"cpu": {"path": "checkpoint", "verified": False}}
    assert sorted(p.name for p in (eng / "tokenizer").iterdir()) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    # the hash fed from the pass's own reads equals a plain read of every file
    assert m.source_sha256 == tree_sha256(source) == Manifest.load(converted[(1, 1)]).source_sha256


def test_bf16_and_llama_and_tied(tmp_path):
    spec = llama_spec(layers=2)
    src = make_source(tmp_path / "llama", spec)
    assert json.loads((src / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    out = convert(src, tmp_path / "e", tp=2, dtype="bf16", progress=False).out
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and len(cfg["layer_configs"]) == 2
    assert cfg["layer_configs"][0]["attention"] == {"impl": "attention", "num_key_value_heads": 2}
    full = read_all(src)
    r1 = rank_tensors(out / "checkpoint", 1)
    assert {t.dtype for t in r1.values()} == {torch.bfloat16}
    assert torch.equal(r1["transformer.layers.1.ffn.gate.weight"],
                       full["model.layers.1.mlp.up_proj.weight"][128:].to(torch.bfloat16))
    # tied embeddings: lm_head comes from the embedding
    from dataclasses import replace
    tied = make_source(tmp_path / "tied", replace(hetero_spec(), tie_embeddings=True))
    out = convert(tied, tmp_path / "t", tp=2, progress=False).out
    emb = read_all(tied)["model.embed_tokens.weight"]
    head = torch.cat([rank_tensors(out / "checkpoint", r)["lm_head.weight"] for r in range(2)])
    assert torch.equal(head[:99], emb) and not head[99:].any()


def test_each_source_tensor_read_once(source, tmp_path, monkeypatch):
    from export.io.raw_tensors import RawTensors
    reads: list[tuple[str, int, int]] = []
    original = RawTensors.read

    def counting(self, name, first=0, stop=None):
        t = original(self, name, first, stop)
        reads.append((name, first, first + (t.shape[0] if t.dim() else 1)))
        return t

    monkeypatch.setattr(RawTensors, "read", counting)
    for other in ("get", "get_slice", "read"):  # no other path to the weights
        monkeypatch.setattr(CheckpointReader, other, lambda *a: pytest.fail("read outside the pass"))
    convert(source, tmp_path / "e", tp=4, progress=False, window_bytes=3000)
    full = read_all(source)
    assert {name for name, _, _ in reads} == set(full)
    for name, t in full.items():  # each tensor's windows tile its rows exactly once
        spans = [(a, b) for n, a, b in reads if n == name]
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == t.shape[0], name
    assert len(reads) > len(full)  # big tensors really were windowed


def test_completeness_check_catches_table_bugs(monkeypatch):
    spec, mapping = hetero_spec(), Mapping(2, 2)
    plans = plan_checkpoint(spec, mapping)
    assert check_complete(spec, mapping, plans) == []
    dropped = plans[1].placements.pop(3)
    assert any(dropped.name in p for p in check_complete(spec, mapping, plans))
    monkeypatch.setitem(names.TRTLLM_NAMES, names.Role.UP, names.TRTLLM_NAMES[names.Role.GATE])
    assert any("ffn.fc" in p and "not packed" in p for p in names.check_name_table())


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, "tp=3 does not divide num_attention_heads=8"),
    (16, 1, "tp=16 does not divide num_attention_heads=8"),
    (2, 3, r"pp=3: stage 2 \(layers 6-7\) has no full-attention layer, which trtllm-build cannot build"),
    (1, 9, "pp=9 is more stages than the 8 layers"),
])
def test_bad_layout_refused_before_writing(source, tmp_path, tp, pp, message):
    with pytest.raises(ExportError, match=message):
        convert(source, tmp_path / "e", tp=tp, pp=pp, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_width_not_divisible_names_layer(tmp_path):
    from dataclasses import replace

    from tests.conftest import full
    spec = replace(llama_spec(), layers=(full(2, 102),) * 2)  # plain Llama: any intermediate_size
    src = make_source(tmp_path / "s", spec)
    with pytest.raises(ExportError, match="layer 1: tp=4 does not divide FFN width 102"):
        convert(src, tmp_path / "e", tp=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_invalid_source_refused_before_writing(source, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    f = next(p for p in sorted(bad.glob("*.safetensors")) if "model.layers.3.mlp.down_proj.weight" in load_file(p))
    tensors = load_file(f)
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mlp\.down_proj\.weight"):
        convert(bad, tmp_path / "e", tp=2, progress=False)
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))


@pytest.mark.slow
def test_cli_convert(source, tmp_path):
    out = subprocess.run([sys.executable, "-m", "export", "convert", str(source), "--tp", "2", "--pp", "2",
                          "--dtype", "bf16", "--out", str(tmp_path / "e")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "4 rank files, tp=2 pp=2, bfloat16" in out.stdout and "MB/s" in out.stdout
    assert Manifest.load(tmp_path / "e").dtype == "bfloat16"
    bad = subprocess.run([sys.executable, "-m", "export", "convert", str(source), "--tp", "3", "--out",
                          str(tmp_path / "f")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "tp=3 does not divide" in bad.stderr and not (tmp_path / "f").exists()


def test_failure_mid_pass_leaves_nothing(source, tmp_path, monkeypatch):
    from export.io.raw_tensors import RawTensors
    original, calls = RawTensors.read, []

    def failing(self, name, first=0, stop=None):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk on fire")
        return original(self, name, first, stop)

    monkeypatch.setattr(RawTensors, "read", failing)
    with pytest.raises(OSError, match="disk on fire"):
        convert(source, tmp_path / "e", tp=2, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("context,want", [(512, (256, 512)), (4096, (1024, 2048)), (131072, (1024, 2048))])
def test_default_build_leaves_room_to_generate(context, want):
    """A maximum-length prompt must still be able to generate (the demo had 512 == 512)."""
    from dataclasses import replace

    from export.trtllm.convert import default_build

    build = default_build(replace(hetero_spec(), max_position_embeddings=context))
    assert (build["max_input_len"], build["max_seq_len"]) == want


@pytest.mark.slow
def test_cli_convert_and_verify_json(source, tmp_path):
    """Summaries as JSON for scripts; one rate unit in what convert prints (MB/s) on both streams."""
    run = subprocess.run([sys.executable, "-m", "export", "convert", str(source), "--tp", "2", "--out",
                          str(tmp_path / "e"), "--no-progress", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    assert (res["tp"], res["pp"], res["bytes_read"] > 0) == (2, 1, True)
    assert "GB/s" not in run.stderr
    ver = subprocess.run([sys.executable, "-m", "export", "verify", str(tmp_path / "e"), "--json"],
                         capture_output=True, text=True)
    assert ver.returncode == 0, ver.stderr
    assert json.loads(ver.stdout)["passed"] is True

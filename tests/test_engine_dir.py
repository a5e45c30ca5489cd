"""EngineDir (where things live in engines/NAME), the weights-source registry, the one tokenizer
search rule, and the tied lm_head as an alias in the tensor table. No conversion: hand-made dirs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from export.engine_dir import EngineDir, hf_checkpoint, onnx_dir, weights_dir
from export.errors import ExportError
from export.io.tokenizer import load_tokenizer, tokenizer_places
from export.manifest import Manifest
from export.mapping import Mapping
from export.sources import FORMATS, detect, load_spec, open_source
from export.synthetic import write_random_checkpoint
from export.tensors import TIED_ALIASES, Role, global_ref, model_tensors, tied_tensors
from tests.conftest import hetero_spec, write_tokenizer


def make_engine_dir(tmp_path, source, **fields):
    eng = tmp_path / "engines" / "m"
    (eng / "checkpoint").mkdir(parents=True)
    Manifest(source_path=str(source), source_sha256="0" * 64, tp=1, pp=1, dtype="float32", **fields).save(eng)
    return eng


def test_engine_dir_paths_come_from_the_manifest(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", hetero_spec())
    eng = make_engine_dir(tmp_path, src, tokenizer=None, checkpoint="ckpt")
    (eng / "ckpt").mkdir()
    e = EngineDir(eng)
    assert e.checkpoint == eng / "ckpt" and e.tokenizer is None and e.onnx == eng / "onnx"
    assert e.hf_source == src and e.tp1_weights() == eng / "ckpt"
    assert weights_dir(eng) == eng / "ckpt" and weights_dir(src) == src
    assert EngineDir.around(eng / "ckpt").path == eng and EngineDir.of(src) is None
    assert hf_checkpoint(eng) == src and hf_checkpoint(src) == src


def test_gone_source_and_missing_graph_are_one_line_errors(tmp_path):
    eng = make_engine_dir(tmp_path, tmp_path / "gone")
    with pytest.raises(ExportError, match=r"HF source .* is gone"):
        _ = EngineDir(eng).hf_source
    with pytest.raises(ExportError, match="no ONNX graph"):
        onnx_dir(eng / "checkpoint")
    (eng / "onnx").mkdir()
    (eng / "onnx" / "model.onnx").write_bytes(b"")
    assert onnx_dir(eng) == onnx_dir(eng / "checkpoint") == eng / "onnx"


def test_one_tokenizer_search_rule(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", hetero_spec())
    eng = make_engine_dir(tmp_path, src)
    assert tokenizer_places(eng / "checkpoint")[:2] == [eng / "checkpoint", eng / "tokenizer"]
    with pytest.raises(ExportError, match="no tokenizer found"):
        load_tokenizer(eng / "checkpoint")
    with pytest.raises(ExportError, match=r"no tokenizer\.json found"):
        load_tokenizer(eng, kind="tokenizers")
    (eng / "tokenizer").mkdir()
    write_tokenizer(eng / "tokenizer")
    for kind in ("transformers", "tokenizers", "serving"):
        assert load_tokenizer(eng / "checkpoint", kind=kind) is not None, kind
    with pytest.raises(ExportError, match=r"no tokenizer\.json \(a fast"):  # an explicit directory is the only place
        load_tokenizer(eng, tmp_path / "src", kind="serving")


def test_registry_detects_hf_and_opens_lazily(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", hetero_spec())
    assert detect(src) == (src, FORMATS[-1]) and FORMATS[-1].name == "hf"
    spec, mapping, make = open_source(src)
    assert mapping is None and load_spec(src) == spec
    assert make(Mapping(2), 1).get(Role.EMBED).shape == (spec.vocab, spec.hidden)  # the embedding is repeated
    with pytest.raises(ExportError, match="not a checkpoint directory"):
        open_source(tmp_path / "nothing")


def test_tied_lm_head_is_an_alias_of_the_embedding(tmp_path):
    spec = replace(hetero_spec(), tie_embeddings=True)
    head = global_ref(spec, Role.LM_HEAD)
    assert head.alias is TIED_ALIASES[Role.LM_HEAD] and head.hf_name == "model.embed_tokens.weight"
    assert tied_tensors(spec) == [head] and head not in model_tensors(spec)
    assert global_ref(hetero_spec(), Role.LM_HEAD).hf_name == "lm_head.weight" and not tied_tensors(hetero_spec())
    path = write_random_checkpoint(tmp_path / "t", spec)
    _, _, make = open_source(path)
    w = make(Mapping(), 0)
    assert torch.equal(w.get(Role.LM_HEAD), w.get(Role.EMBED))

"""open_trtllm_checkpoint: rank files read back equal what the runtime slices from the HF source."""

from __future__ import annotations

import json
import os

import pytest
import torch

from export.errors import CheckpointError, ConfigError, ExportError
from export.io.reader import CheckpointReader
from export.manifest import Manifest
from export.mapping import Mapping
from export.rank_weights import HFRankWeights
from export.tensors import Role, layer_roles
from export.trtllm.config import parse_trtllm_config, trtllm_config
from export.trtllm.convert import convert
from export.trtllm.rank_files import open_trtllm_checkpoint
from tests.conftest import hetero_spec
from tests.trtllm_helpers import make_source


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("w")
    src = make_source(root / "src", hetero_spec())
    return src, {lay: convert(src, root / f"e{lay}", tp=lay[0], pp=lay[1], progress=False).out
                 for lay in [(4, 1), (2, 2)]}


@pytest.mark.parametrize("layout", [(4, 1), (2, 2)])
def test_rank_weights_equal_hf_rank_weights(pair, layout):
    src, engines = pair
    spec, mapping, open_rank = open_trtllm_checkpoint(engines[layout])
    assert mapping == Mapping(*layout) and spec.layers == hetero_spec().layers and spec.vocab == 99
    assert spec.rope_scaling == hetero_spec().rope_scaling and spec.head_dim == 8
    reader = CheckpointReader(src)
    for rank in mapping.ranks():
        trt, hf = open_rank(mapping, rank), HFRankWeights(reader, spec, mapping, rank)
        stage = mapping.pp_layers(spec.num_layers, mapping.pp_rank(rank))
        keys = [(role, g) for g in stage for role, _ in layer_roles(spec, g)]
        keys += [(Role.EMBED, None)] if mapping.is_first_stage(rank) else []
        keys += [(Role.FINAL_NORM, None), (Role.LM_HEAD, None)] if mapping.is_last_stage(rank) else []
        for role, layer in keys:
            assert torch.equal(trt.get(role, layer), hf.get(role, layer)), (rank, role, layer)
        with pytest.raises(KeyError):
            trt.get(Role.Q, 7)  # the empty layer has no q


def test_checkpoint_dir_also_accepted_and_mapping_checked(pair):
    _, engines = pair
    _, _, open_rank = open_trtllm_checkpoint(engines[(4, 1)] / "checkpoint")
    with pytest.raises(ExportError, match="written for tp=4, pp=1"):
        open_rank(Mapping(2), 0)


def test_damaged_rank_files_reported_by_name(pair, tmp_path):
    import shutil
    _, engines = pair
    eng = tmp_path / "e"
    shutil.copytree(engines[(2, 2)], eng)
    (eng / "checkpoint" / "rank3.safetensors").unlink()
    f = eng / "checkpoint" / "rank1.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError) as e:
        open_trtllm_checkpoint(eng)
    assert "rank3.safetensors is missing" in str(e.value) and "rank1.safetensors" in str(e.value)


def test_config_reader_refuses_bad_layer_configs():
    cfg = trtllm_config(hetero_spec(), Mapping(2), "float32")
    assert parse_trtllm_config(cfg)[0].layers == hetero_spec().layers
    cfg["layer_configs"][3]["ffn"]["ffn_mult"] = 1.0
    del cfg["max_position_embeddings"]
    with pytest.raises(ConfigError) as e:
        parse_trtllm_config(json.loads(json.dumps(cfg)))
    assert "'max_position_embeddings' is missing" in str(e.value)
    cfg["max_position_embeddings"] = 256
    with pytest.raises(ConfigError, match=r"layer 3: .*ffn\.ffn_mult"):
        parse_trtllm_config(cfg)


def test_manifest_round_trip_and_errors(pair, tmp_path):
    _, engines = pair
    m = Manifest.load(engines[(4, 1)])
    m.engines["cpu"]["verified"] = True
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m
    with pytest.raises(ExportError, match=r"no manifest\.json"):
        Manifest.load(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text(json.dumps({"tp": 1}))
    with pytest.raises(ExportError, match="required field 'source_sha256' is missing"):
        Manifest.load(tmp_path)

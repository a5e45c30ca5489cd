"""RoPE settings from configs the installed transformers writes (`rope_parameters`, transformers 5)
and from older ones (`rope_theta` / `rope_scaling`): parsed the same, converted to TRT-LLM's
`rotary_base` / `rotary_scaling`, written back in the source's schema, and executed exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from export.errors import ConfigError
from export.spec import ModelSpec, RopeScaling, RopeSchema, parse_hf_config

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _hf_llama(tmp_path, rope_scaling=None, theta=500000.0, save_model=False):
    """A tiny Llama saved by the installed transformers' own `save_pretrained`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=256, vocab_size=97, rope_theta=theta, rope_scaling=rope_scaling,
                      max_position_embeddings=256, tie_word_embeddings=False)
    if save_model:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():  # sharp attention, so positions matter
                if "norm" not in name:
                    p.normal_(0, 0.5 if ("q_proj" in name or "k_proj" in name) else 0.1)
        model.save_pretrained(tmp_path)
        return model
    cfg.save_pretrained(tmp_path)
    return None


def test_transformers5_default_and_llama3_rope_are_read(tmp_path):
    _hf_llama(tmp_path / "plain", theta=123456.0)
    _hf_llama(tmp_path / "l3", rope_scaling=dict(LLAMA3))
    plain = json.loads((tmp_path / "plain/config.json").read_text())
    assert "rope_parameters" in plain and "rope_theta" not in plain  # what transformers 5 writes
    assert ModelSpec.load(tmp_path / "plain").rope_theta == 123456.0
    spec = ModelSpec.load(tmp_path / "l3")
    assert spec.rope_theta == 500000.0
    assert spec.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
    assert spec.rope_schema is RopeSchema.PARAMETERS


def test_written_hf_config_keeps_the_source_schema(tmp_path):
    _hf_llama(tmp_path, rope_scaling=dict(LLAMA3))
    new = ModelSpec.load(tmp_path).to_hf_config()
    assert "rope_theta" not in new and "rope_scaling" not in new
    assert new["rope_parameters"] == {**LLAMA3, "rope_theta": 500000.0}
    old = parse_hf_config({**json.loads((tmp_path / "config.json").read_text()) | {"rope_parameters": None},
                           "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3)}).to_hf_config()
    assert "rope_parameters" not in old and old["rope_theta"] == 500000.0
    assert parse_hf_config(new) == parse_hf_config(old)


def test_disagreeing_schemas_are_refused(tmp_path):
    _hf_llama(tmp_path, rope_scaling=dict(LLAMA3))
    cfg = json.loads((tmp_path / "config.json").read_text())
    parse_hf_config({**cfg, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3)})  # agreeing: fine
    with pytest.raises(ConfigError, match="disagrees"):
        parse_hf_config({**cfg, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"rope_parameters.*'factor'"):
        parse_hf_config({**cfg, "rope_parameters": {**cfg["rope_parameters"], "factor": "8"}})


@pytest.mark.slow
def test_convert_writes_rotary_base_and_llama3_scaling(tmp_path):
    """The issue's acceptance check, through the CLI on a checkpoint transformers saved."""
    _hf_llama(tmp_path / "src", rope_scaling=dict(LLAMA3), save_model=True)
    out = subprocess.run([sys.executable, "-m", "export", "convert", str(tmp_path / "src"), "--tp", "1",
                          "--out", str(tmp_path / "eng"), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "eng/checkpoint/config.json").read_text())
    assert cfg["rotary_base"] == 500000.0
    assert cfg["rotary_scaling"]["rope_type"] == "llama3" and cfg["rotary_scaling"]["factor"] == 8.0
    assert cfg["rotary_scaling"]["original_max_position_embeddings"] == 16


def test_llama3_scaled_logits_match_transformers_past_original_context(tmp_path):
    """Positions up to 48 > original_max_position_embeddings 16, where llama3 scaling changes
    the low frequencies: a runtime that ignored the scaling (or the theta) is far off here."""
    from export.io.reader import CheckpointReader
    from export.mapping import Mapping
    from export.rank_weights import HFRankWeights
    from export.runtime.model import load_decoder

    hf = _hf_llama(tmp_path, rope_scaling=dict(LLAMA3), save_model=True)
    spec = ModelSpec.load(tmp_path)
    dec = load_decoder(HFRankWeights(CheckpointReader(tmp_path), spec, Mapping(), 0))
    ids = torch.randint(0, spec.vocab, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref, ours = hf(ids).logits, dec(ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    unscaled = load_decoder(HFRankWeights(CheckpointReader(tmp_path), replace(spec, rope_scaling=None), Mapping(), 0))
    with torch.inference_mode():
        assert (unscaled(ids) - ref)[0, 16:].abs().max().item() > 0.5  # the test can see the scaling


def test_trtllm_rotary_fields_round_trip_through_the_one_scaling_parser():
    """TRT-LLM's config renders the spec's rope (`rotary_*`); reading it back uses the spec's parser."""
    from export.mapping import Mapping
    from export.trtllm.config import parse_trtllm_config, trtllm_config
    from tests.conftest import llama_spec

    spec = replace(llama_spec(), rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))
    cfg = trtllm_config(spec, Mapping(), "float32")
    back, _ = parse_trtllm_config(cfg)
    assert back.rope_theta == 500000.0 and back.rope_scaling == spec.rope_scaling
    with pytest.raises(ConfigError, match=r"rotary_scaling: field 'rope_type' = 'yarn'"):
        parse_trtllm_config({**cfg, "rotary_scaling": {**cfg["rotary_scaling"], "rope_type": "yarn", "type": "yarn"}})

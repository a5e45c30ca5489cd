"""transformers loads our DeciLM checkpoints through their remote code and computes what our runtime does."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import EMPTY, LINEAR, ROPE, attn_only, ffn_only, full, hetero_spec, write_tokenizer

from export.demo.paths import DEMO_LLAMA, DEMO_PUZZLE
from export.deployment_plan import attention_free_runs
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import FusionPlan
from export.hf_code import AUTO_MAP, CODE_FILES, HF_CODE_DIR, install_remote_code
from export.io.reader import CheckpointReader
from export.mapping import Mapping
from export.rank_weights import HFRankWeights
from export.runtime.model import load_decoder
from export.runtime.steps import Decode, Prefill, Stepper
from export.spec import ModelSpec, RopeSchema
from export.synthetic import llama_config, write_random_checkpoint

NEW_TOKENS = 12


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def odd_spec() -> ModelSpec:
    """Layer 0 without attention (cache slot 0 is layer 1's), a width no ffn_mult gives (the config
    says intermediate_size), linear replacements, an empty block, llama3 RoPE saved as transformers
    5's `rope_parameters` only."""
    layers = (ffn_only(320), full(2, 256), LINEAR, EMPTY, attn_only(1), full(4, 512))
    return ModelSpec(hidden=64, heads=8, head_dim=8, vocab=97, layers=layers, rope_theta=500000.0,
                     rope_scaling=ROPE, rope_schema=RopeSchema.PARAMETERS, dtype="float32",
                     max_position_embeddings=256, passthrough={"bos_token_id": 1, "eos_token_id": 2})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory, each loadable with trust_remote_code (built once for the module)."""
    root = tmp_path_factory.mktemp("remote")
    hetero = write_random_checkpoint(root / "hetero", hetero_spec(), seed=5, std=0.08)
    assert install_remote_code(hetero)
    odd = write_random_checkpoint(root / "odd", odd_spec(), seed=6, std=0.08)
    assert install_remote_code(odd)
    src = write_random_checkpoint(root / "plain", hetero_spec(), seed=7, std=0.08)  # no auto_map, no code
    fused_synthetic = fuse_checkpoint(src, FusionPlan([(2, 4)]), root / "fused_synthetic", progress=False).out
    (run,) = attention_free_runs(ModelSpec.load(DEMO_PUZZLE))
    fused_demo = fuse_checkpoint(DEMO_PUZZLE, FusionPlan([(run[0], run[-2])]), root / "fused_demo",
                                 progress=False).out
    return {"demo_llama": DEMO_LLAMA, "demo_puzzle": DEMO_PUZZLE, "fused_demo": fused_demo,
            "fused_synthetic": fused_synthetic, "linear_and_empty": hetero, "odd": odd}


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def _ours(path):
    spec = ModelSpec.load(path)
    return load_decoder(HFRankWeights(CheckpointReader(path), spec, Mapping(), 0)), spec


def _greedy(dec, prompt: list[int], n: int) -> list[int]:
    st = Stepper(dec)
    logits = st.run(Prefill((0,), (tuple(prompt),)))
    out: list[int] = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = st.run(Decode((0,), (out[-1],)))
    return out


@pytest.mark.parametrize("name", ["demo_llama", "demo_puzzle", "fused_demo", "fused_synthetic",
                                  "linear_and_empty", "odd"])
def test_transformers_logits_and_greedy_equal_our_runtime(checkpoints, name):
    path = checkpoints[name]
    hf, (dec, spec) = _hf(path), _ours(path)
    assert type(hf).__name__ == "DeciLMForCausalLM"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec.vocab, (2, 11), generator=gen)
    with torch.inference_mode():
        ref, ours = hf(ids).logits, dec(ids)
    assert ref.shape == ours.shape == (2, 11, spec.vocab)
    assert ref.abs().max() > 0.1  # not degenerate
    assert (ref - ours).abs().max().item() <= 1e-4
    with torch.inference_mode():
        hf_tokens = hf.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                                pad_token_id=0)[0, 11:].tolist()
        ours = _greedy(dec, ids[0].tolist(), NEW_TOKENS)
    eos = hf.generation_config.eos_token_id
    if eos in ours:  # generate stops after the first end-of-sequence token
        ours = ours[:ours.index(eos) + 1]
    assert len(ours) >= 4 and ours == hf_tokens


def test_cache_holds_attention_layers_only_and_decodes_like_a_full_forward(checkpoints):
    hf = _hf(checkpoints["odd"])
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full_logits = hf(ids, use_cache=False).logits
        out = hf(ids[:, :6], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        assert cache.get_seq_length() == 6  # layer 0 has no attention: slot 0 is layer 1's
        assert sum(layer.get_seq_length() > 0 for layer in cache.layers) == 3  # layers 1, 4, 5
        steps = [hf(ids[:, j:j + 1], cache=cache, use_cache=True).logits[:, -1] for j in range(6, 9)]
    assert (torch.stack(steps, 1) - full_logits[:, 6:]).abs().max().item() <= 1e-4


def test_block_configs_read_as_attributes_and_as_dicts(checkpoints):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(DEMO_PUZZLE, trust_remote_code=True)
    assert cfg.model_type == "nemotron-nas" and cfg.num_hidden_layers == 12
    for i, lay in enumerate(ModelSpec.load(DEMO_PUZZLE).layers):
        block = cfg.block_configs[i]
        assert block.attention.no_op is block["attention"]["no_op"] is (not lay.has_attention)
        assert block.ffn.ffn_mult == block["ffn"]["ffn_mult"] == lay.ffn.ffn_mult
        assert block.attention.n_heads_in_group == (8 // lay.attention.kv_heads if lay.has_attention else None)
    odd = AutoConfig.from_pretrained(checkpoints["odd"], trust_remote_code=True)
    ffn = odd.block_configs[0].ffn
    assert ffn.intermediate_size == 320 and not hasattr(ffn, "ffn_mult")  # vLLM: hasattr picks the rule
    assert odd.block_configs[2].attention.replace_with_linear and odd.block_configs[3].ffn.no_op
    assert odd.rope_parameters["rope_type"] == "llama3" and odd.rope_parameters["rope_theta"] == 500000.0
    hetero = AutoConfig.from_pretrained(checkpoints["linear_and_empty"], trust_remote_code=True)
    assert hetero.rope_parameters["factor"] == ROPE.factor  # from rope_theta + rope_scaling
    assert json.loads(hetero.to_json_string())["block_configs"][6]["ffn"]["replace_with_linear"] is True


def test_shipped_demo_models_carry_the_package_code():
    for d in (DEMO_LLAMA, DEMO_PUZZLE):
        assert json.loads((d / "config.json").read_text())["auto_map"] == AUTO_MAP
        for name in CODE_FILES:
            assert (d / name).read_bytes() == (HF_CODE_DIR / name).read_bytes(), f"{d / name} is stale"
        assert not install_remote_code(d)  # already has its auto_map: untouched


def test_fuse_installs_code_only_where_the_source_has_none(checkpoints, tmp_path):
    fused = checkpoints["fused_synthetic"]
    assert json.loads((fused / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert all((fused / n).read_bytes() == (HF_CODE_DIR / n).read_bytes() for n in CODE_FILES)

    own_map = {"AutoConfig": "my_config.MyConfig", "AutoModelForCausalLM": "my_model.MyModel"}
    spec = replace(hetero_spec(), passthrough={"auto_map": own_map})
    src = write_random_checkpoint(tmp_path / "own", spec, seed=8)
    (src / "my_config.py").write_text("# the source's own remote code\n")
    write_tokenizer(src)
    out = fuse_checkpoint(src, FusionPlan([(2, 4)]), tmp_path / "fused_own", progress=False).out
    assert json.loads((out / "config.json").read_text())["auto_map"] == own_map
    assert (out / "my_config.py").read_text() == "# the source's own remote code\n"
    assert not any((out / n).exists() for n in CODE_FILES)


def test_install_leaves_plain_llama_alone(tmp_path):
    from conftest import llama_spec

    path = write_random_checkpoint(tmp_path / "llama", llama_spec(layers=1), seed=0)
    before = (path / "config.json").read_text()
    assert json.loads(before) == llama_config(llama_spec(layers=1))
    assert not install_remote_code(path)
    assert (path / "config.json").read_text() == before and not (path / CODE_FILES[0]).exists()


def test_left_padded_batch_generates_what_each_prompt_does_alone():
    hf = _hf(DEMO_PUZZLE)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 4096, (1, 9), generator=gen), torch.randint(3, 4096, (1, 5), generator=gen)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        alone = [hf.generate(p, **kw)[0, p.shape[1]:].tolist() for p in (a, b)]
        batch = hf.generate(ids, attention_mask=mask, **kw)[:, 9:].tolist()
    assert batch == alone


@pytest.mark.parametrize("name", ["odd", "linear_and_empty", "fused_demo"])
def test_config_saved_by_transformers_parses_to_the_same_spec(checkpoints, name, tmp_path):
    from transformers import AutoConfig

    AutoConfig.from_pretrained(checkpoints[name], trust_remote_code=True).save_pretrained(tmp_path)
    saved, spec = ModelSpec.load(tmp_path), ModelSpec.load(checkpoints[name])
    assert saved == spec and (saved.rope_theta, saved.rope_scaling) == (spec.rope_theta, spec.rope_scaling)


def test_consumers_read_the_blocks_as_they_expect(checkpoints):
    """TensorRT-LLM's PyTorch model: per-layer kv heads from `block.attention.n_heads_in_group` (0 where
    falsy) assigned back onto the config, widths from `block.ffn.ffn_mult`; vLLM: `ffn_mult` when
    `hasattr`, else `intermediate_size`. Block parts survive deepcopy and pickle as attribute-readable dicts."""
    import copy
    import pickle

    from transformers import AutoConfig

    from export.spec import ffn_mult_to_width

    for name in ("odd", "fused_demo"):
        cfg = AutoConfig.from_pretrained(checkpoints[name], trust_remote_code=True)
        spec = ModelSpec.load(checkpoints[name])
        cfg.num_key_value_heads = [cfg.num_attention_heads // b.attention.n_heads_in_group
                                   if b.attention.n_heads_in_group else 0 for b in cfg.block_configs]
        assert cfg.num_key_value_heads == [lay.attention.kv_heads or 0 for lay in spec.layers]
        for b, lay in zip(cfg.block_configs, spec.layers):
            if lay.ffn.kind == "mlp":
                width = (ffn_mult_to_width(b.ffn.ffn_mult, spec.hidden) if hasattr(b.ffn, "ffn_mult")
                         else b.ffn.intermediate_size)
                assert width == lay.ffn.width
        for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
            assert clone.block_configs[0].attention.no_op == cfg.block_configs[0]["attention"]["no_op"]

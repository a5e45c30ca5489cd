"""The shipped demo models: present, within budget, loadable, as good as their cards say."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import ffn_only, full

from export.card import card_facts, write_card
from export.demo import heldout as ho
from export.demo.corpus import corpus_files, split
from export.demo.hf_model import build_model, load_model, logits_fn, write_checkpoint
from export.demo.paths import DEMO_LLAMA, DEMO_PUZZLE
from export.demo.puzzle import choose_run, distill_loss
from export.errors import CheckpointError
from export.io.reader import CheckpointReader
from export.spec import ModelSpec

MODELS = [DEMO_LLAMA, DEMO_PUZZLE]
SHIPPED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "generation_config.json", "README.md"]
BUDGET_BYTES = 25_000_000
PPL_MARGIN = 1.02  # same bf16 weights, same slice, same forward: only float reduction order differs


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def attention_free_runs(spec: ModelSpec) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, lay in enumerate(spec.layers):
        if not lay.has_attention and lay.has_ffn:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return runs


def test_shipped_files_exist_within_budget():
    total = 0
    for d in MODELS:
        for name in SHIPPED:
            assert (d / name).is_file(), f"{d / name} is missing"
        total += sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total <= BUDGET_BYTES, f"shipped demo models total {total} bytes > {BUDGET_BYTES}"


@pytest.mark.parametrize("directory", MODELS, ids=["llama", "puzzle"])
def test_checkpoint_validates_against_its_config(directory):
    spec = ModelSpec.load(directory)
    refs = CheckpointReader(directory).validate(spec)
    assert spec.architecture == "DeciLMForCausalLM" and spec.dtype == "bfloat16"
    assert len(refs) == len(CheckpointReader(directory).names())
    assert json.loads((directory / "config.json").read_text())["block_configs"]


def test_llama_has_attention_everywhere_and_varying_widths():
    spec = ModelSpec.load(DEMO_LLAMA)
    assert spec.attention_layers() == list(range(spec.num_layers)) == list(range(12))
    assert len({lay.ffn.width for lay in spec.layers}) > 1


def test_puzzle_has_attention_free_run_matching_card():
    spec = ModelSpec.load(DEMO_PUZZLE)
    runs = [r for r in attention_free_runs(spec) if len(r) >= 4]
    assert runs, f"no attention-free run of >= 4 layers in {[lay.short() for lay in spec.layers]}"
    assert card_facts(DEMO_PUZZLE)["attention_removed"] == ",".join(map(str, runs[0]))
    assert 0 not in runs[0] and spec.num_layers - 1 not in runs[0], "the run must be in the middle"
    assert ModelSpec.load(DEMO_LLAMA).layers[runs[0][0]].ffn == spec.layers[runs[0][0]].ffn


@pytest.mark.parametrize("directory", MODELS, ids=["llama", "puzzle"])
def test_tokenizer_loads_offline_and_round_trips_python(directory):
    tok = ho.load_tokenizer(directory)
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    src = inspect.getsource(json) + "\n\tx = 'tab\\tand  spaces'  # ünïcode ✓\n\n\n   \n"
    ids = tok.encode(src, add_special_tokens=False)
    assert tok.decode(ids) == src
    assert len(ids) < len(src) / 2, "BPE should compress Python source"


@pytest.mark.slow
@pytest.mark.parametrize("directory", MODELS, ids=["llama", "puzzle"])
def test_heldout_perplexity_matches_card(directory):
    facts = card_facts(directory)
    _, model = load_model(directory)
    loss = ho.heldout_loss(logits_fn(model), ho.load_tokenizer(directory), int(facts["test_slice_tokens"]))
    assert ho.perplexity(loss) <= float(facts["test_slice_ppl"]) * PPL_MARGIN
    assert ho.perplexity(loss) < 1000, "a trained model, not a random one (uniform over 4096 tokens is 4096)"


def test_corpus_split_is_disjoint_and_stable():
    files = corpus_files()
    train, held = split(files)
    assert held and train and not {f.rel for f in train} & {f.rel for f in held}
    assert 0.02 < len(held) / len(files) < 0.10
    assert all("site-packages" not in f.rel and "/test/" not in f"/{f.rel}" for f in files)
    assert split(corpus_files())[1] == held


def test_heldout_tokens_are_deterministic_prefixes():
    tok = ho.load_tokenizer(DEMO_LLAMA)
    a, b = ho.heldout_tokens(tok, 300), ho.heldout_tokens(DEMO_LLAMA, 600)
    assert len(a) == 300 and a == b[:300] and a[0] == 1
    assert ho.windows(b, 99).shape == (6, 100)


def test_choose_run_picks_least_important_middle_run():
    scores = [0.0, 0.5, 0.4, 0.01, 0.02, 0.01, 0.03, 0.3, 0.2, 0.0]
    assert choose_run(scores, 4) == [3, 4, 5, 6]
    assert choose_run([0.0] * 6, 4) == [1, 2, 3, 4]  # never the first or last layer
    with pytest.raises(ValueError, match="no run of 4"):
        choose_run([0.0] * 5, 4)


def test_distill_loss_is_zero_only_for_equal_logits():
    t = torch.randn(2, 5, 11)
    assert distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(torch.randn(2, 5, 11), t).item() > 0.01


def test_tiny_model_round_trips_through_checkpoint(tmp_path):
    spec = ModelSpec(hidden=64, heads=4, head_dim=16, vocab=50, tie_embeddings=True, dtype="float32",
                     layers=(full(2, 256), ffn_only(512), full(1, 256)), max_position_embeddings=64)
    model = build_model(spec, seed=3)
    write_checkpoint(model, spec, tmp_path)
    loaded_spec, loaded = load_model(tmp_path)
    assert loaded_spec == spec
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    names = CheckpointReader(tmp_path).names()
    assert "model.layers.1.input_layernorm.weight" not in names and "lm_head.weight" not in names


def test_load_refuses_a_checkpoint_missing_a_tensor(tmp_path):
    spec = ModelSpec(hidden=64, heads=4, head_dim=16, vocab=50, tie_embeddings=True, dtype="float32",
                     layers=(full(2, 256), full(2, 256)))
    write_checkpoint(build_model(spec, seed=0), spec, tmp_path)
    bigger = spec.with_layers([full(2, 256), full(2, 512)])
    (tmp_path / "config.json").write_text(json.dumps(bigger.to_hf_config()))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.gate_proj.weight: shape \[256, 64\]"):
        load_model(tmp_path)


def test_card_front_matter_round_trips(tmp_path):
    write_card(tmp_path, {"heldout_ppl": 12.3456789, "attention_removed": "3,4,5,6"}, "T", "body")
    assert card_facts(tmp_path) == {"heldout_ppl": "12.3457", "attention_removed": "3,4,5,6"}

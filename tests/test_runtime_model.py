"""The decoder against external references: transformers' Llama, and an independent DeciLM computation."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from export.io.reader import CheckpointReader
from export.mapping import Mapping
from export.rank_weights import HFRankWeights
from export.runtime.model import load_decoder
from export.runtime.steps import Decode, Prefill, Stepper
from export.synthetic import write_random_checkpoint
from tests.conftest import hetero_spec, llama_spec

torch.manual_seed(0)


def _decoder(path, spec):
    return load_decoder(HFRankWeights(CheckpointReader(path), spec, Mapping(), 0))


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    spec = llama_spec(layers=2)
    return write_random_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", spec, seed=1, std=0.08), spec


@pytest.fixture(scope="module")
def hetero_ckpt(tmp_path_factory):
    spec = hetero_spec()
    return write_random_checkpoint(tmp_path_factory.mktemp("hetero") / "ckpt", spec, seed=2, std=0.08), spec


def test_llama_logits_and_greedy_match_transformers(llama_ckpt):
    from transformers import LlamaForCausalLM

    path, spec = llama_ckpt
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dec = _decoder(path, spec)
    ids = torch.randint(0, spec.vocab, (2, 11))
    with torch.inference_mode():
        ref = hf(ids).logits
        ours = dec(ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    with torch.inference_mode():
        hf_out = hf.generate(ids[:1], max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 11:].tolist()
    assert _greedy(dec, ids[0].tolist(), 12) == hf_out


def _greedy(dec, prompt, n):
    st = Stepper(dec)
    logits = st.run(Prefill((0,), (tuple(prompt),)))
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = st.run(Decode((0,), (out[-1],)))
    return out


# ---- an independent DeciLM computation from the raw HF tensors -------------------------------
def _norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope_tables(spec, t):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=spec.hidden, num_attention_heads=spec.heads, head_dim=spec.head_dim,
                      rope_theta=spec.rope_theta, max_position_embeddings=spec.max_position_embeddings,
                      rope_scaling=spec.rope_scaling.to_hf() | {"rope_theta": spec.rope_theta})
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()  # [T, hd/2]


def _rot(x, cos, sin):  # x [T, heads, hd]; pairs are (j, j + hd/2)
    a, b = x.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def _reference(path, spec, ids):
    """Per token sequence [T]: loops over heads explicitly, no code shared with the runtime."""
    w = load_file(str(path / "model.safetensors"))
    hd, t = spec.head_dim, len(ids)
    cos, sin = _rope_tables(spec, t)
    h = w["model.embed_tokens.weight"][ids]
    for i, lay in enumerate(spec.layers):
        p = f"model.layers.{i}."
        if lay.attention.kind == "attention":
            x = _norm(h, w[p + "input_layernorm.weight"], spec.norm_eps)
            q = _rot((x @ w[p + "self_attn.q_proj.weight"].T).view(t, spec.heads, hd), cos, sin)
            k = _rot((x @ w[p + "self_attn.k_proj.weight"].T).view(t, -1, hd), cos, sin)
            v = (x @ w[p + "self_attn.v_proj.weight"].T).view(t, -1, hd)
            group = spec.heads // lay.attention.kv_heads
            heads = []
            for hh in range(spec.heads):
                scores = q[:, hh] @ k[:, hh // group].T / math.sqrt(hd)
                scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
                heads.append(scores.softmax(-1) @ v[:, hh // group])
            h = h + torch.cat(heads, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
        elif lay.attention.kind == "linear":
            h = h + _norm(h, w[p + "input_layernorm.weight"], spec.norm_eps) @ w[p + "self_attn.linear_attn.weight"].T
        if lay.ffn.kind == "mlp":
            x = _norm(h, w[p + "post_attention_layernorm.weight"], spec.norm_eps)
            g, u = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
            h = h + (g * torch.sigmoid(g) * u) @ w[p + "mlp.down_proj.weight"].T
        elif lay.ffn.kind == "linear":
            h = h + _norm(h, w[p + "post_attention_layernorm.weight"], spec.norm_eps) @ w[p + "mlp.linear_mlp.weight"].T
    return _norm(h, w["model.norm.weight"], spec.norm_eps) @ w["lm_head.weight"].T


def test_decilm_matches_independent_computation(hetero_ckpt):
    path, spec = hetero_ckpt
    dec = _decoder(path, spec)
    ids = torch.randint(0, spec.vocab, (13,))
    with torch.inference_mode():
        ours = dec(ids[None])[0]
        ref = _reference(path, spec, ids)
    assert ref.abs().max() > 0.1  # the reference is not degenerate
    assert (ours - ref).abs().max().item() <= 1e-4


def test_block_by_block_equals_forward(hetero_ckpt):
    path, spec = hetero_ckpt
    dec = _decoder(path, spec)
    ids = torch.randint(0, spec.vocab, (2, 7))
    with torch.inference_mode():
        h = dec.embed(ids)
        for i in range(spec.num_layers):
            h = dec.block(i, h)
        assert torch.equal(dec.head(h), dec(ids))


def test_noop_sublayers_hold_no_parameters_or_cache(hetero_ckpt):
    path, spec = hetero_ckpt
    dec = _decoder(path, spec)
    assert len(dec.params["7"]) == 0  # the empty layer
    assert set(dec.params["2"]) == {"ffn_norm", "gate", "up", "down"}  # ffn-only: no attention norm
    cache = dec.new_cache(slots=2, max_len=10)
    assert set(cache.k) == {0, 1, 5}
    assert cache.nbytes == 2 * 10 * spec.kv_cache_bytes_per_token("float32")
    assert not any(p.is_meta for p in dec.parameters())


def test_cached_decode_and_ragged_batch_match_full_prefill(hetero_ckpt):
    path, spec = hetero_ckpt
    dec = _decoder(path, spec)
    seqs = [torch.randint(0, spec.vocab, (n,)).tolist() for n in (9, 4, 6)]
    with torch.inference_mode():
        full = [dec(torch.tensor([s]))[0] for s in seqs]
    st = Stepper(dec)
    split = [3, 2, 5]  # prefill a ragged batch, then decode the rest token by token, all slots together
    last = st.run(Prefill((0, 1, 2), tuple(tuple(s[:k]) for s, k in zip(seqs, split))))
    for row, k in enumerate(split):
        assert (last[row] - full[row][k - 1]).abs().max() <= 1e-4
    for row, k in enumerate(split):  # then each slot alone, so decode steps see unequal lengths
        for j in range(k, len(seqs[row])):
            out = st.run(Decode((row,), (seqs[row][j],)))
            assert (out[0] - full[row][j]).abs().max() <= 1e-4


def test_tied_embeddings_share_one_tensor_and_match_transformers(tmp_path):
    from dataclasses import replace

    from transformers import LlamaForCausalLM

    from export.tensors import Role

    spec = replace(llama_spec(layers=1), tie_embeddings=True)
    path = write_random_checkpoint(tmp_path / "tied", spec, seed=3, std=0.08)
    dec = _decoder(path, spec)
    assert dec.w(Role.LM_HEAD).data_ptr() == dec.w(Role.EMBED).data_ptr()
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, spec.vocab, (1, 5))
    with torch.inference_mode():
        assert (dec(ids) - hf(ids).logits).abs().max().item() <= 1e-4

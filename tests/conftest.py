"""Tiny models built in the test: heterogeneous DeciLM and uniform Llama descriptions."""

from __future__ import annotations

import pytest

from export.spec import FFN, LLAMA, Attention, AttentionKind, FFNKind, Layer, ModelSpec, RopeScaling


def full(kv: int, width: int) -> Layer:
    return Layer(Attention(AttentionKind.FULL, kv), FFN(FFNKind.SWIGLU, width))


def ffn_only(width: int) -> Layer:
    return Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.SWIGLU, width))


def attn_only(kv: int) -> Layer:
    return Layer(Attention(AttentionKind.FULL, kv), FFN(FFNKind.NOOP))


EMPTY = Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.NOOP))
LINEAR = Layer(Attention(AttentionKind.LINEAR), FFN(FFNKind.LINEAR))
ROPE = RopeScaling(8.0, 1.0, 4.0, 64)


def hetero_spec(dtype: str = "float32") -> ModelSpec:
    """Every layer kind: mixed kv heads (incl. 1 < tp), unequal widths, a wide fused-like FFN,
    an attention-free run, linear replacements, an empty block; 8 layers so pp=2 and 4 divide."""
    layers = (full(2, 256), full(4, 512), ffn_only(256), ffn_only(768), ffn_only(2048),
              attn_only(1), LINEAR, EMPTY)
    return ModelSpec(hidden=64, heads=8, head_dim=8, vocab=99, layers=layers, rope_theta=10000.0,
                     rope_scaling=ROPE, norm_eps=1e-5, tie_embeddings=False, dtype=dtype,
                     max_position_embeddings=256, passthrough={"bos_token_id": 1, "eos_token_id": 2})


def llama_spec(dtype: str = "float32", layers: int = 2) -> ModelSpec:
    return ModelSpec(hidden=64, heads=4, head_dim=16, vocab=128, layers=(full(2, 256),) * layers,
                     rope_theta=500000.0, rope_scaling=ROPE, dtype=dtype,
                     max_position_embeddings=256, architecture=LLAMA)


@pytest.fixture
def hetero() -> ModelSpec:
    return hetero_spec()


def write_tokenizer(directory) -> None:
    """A tiny word-level tokenizer.json that `tokenizers` loads (side-file and tokenizer checks need a real one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))

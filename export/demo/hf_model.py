"""The demo model as transformers Llama building blocks, shaped by a `ModelSpec`.

Training and evaluation use `LlamaForCausalLM` with each layer's `mlp` swapped for a `LlamaMLP` of
that layer's width (and its own kv-head count), and no-op sublayers replaced by modules that add
nothing; the reference runtime has a parity test against exactly this math. Weights go to and
from disk under HF names (`export.tensors.HF_NAMES`) with the DeciLM config from the spec.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from export.errors import ConfigError
from export.hf_code import install_remote_code
from export.io.reader import CheckpointReader
from export.io.safetensors_format import torch_dtype
from export.io.writer import HFCheckpointWriter, write_config
from export.spec import DECILM, FFN, Attention, AttentionKind, FFNKind, Layer, ModelSpec
from export.tensors import model_tensors

INIT_STD = 0.02


class SkipAttention(nn.Module):
    """A no-op attention sublayer: the residual passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, **_: object) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class SkipMLP(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def demo_spec(vocab: int, widths: list[int], *, hidden: int = 256, heads: int = 8, kv_heads: int = 2,
              max_positions: int = 512, passthrough: dict | None = None) -> ModelSpec:
    layers = tuple(Layer(Attention(AttentionKind.FULL, kv_heads), FFN(FFNKind.SWIGLU, w)) for w in widths)
    return ModelSpec(hidden=hidden, heads=heads, head_dim=hidden // heads, vocab=vocab, layers=layers,
                     rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, dtype="bfloat16",
                     max_position_embeddings=max_positions, architecture=DECILM,
                     passthrough=dict(passthrough or {}))


def without_attention(spec: ModelSpec, layers: list[int]) -> ModelSpec:
    """The Puzzle child: the same spec with attention removed (no-op) in `layers`."""
    new = [Layer(Attention(AttentionKind.NOOP), lay.ffn) if i in layers else lay
           for i, lay in enumerate(spec.layers)]
    return spec.with_layers(new)


def _config(spec: ModelSpec):  # -> LlamaConfig
    from transformers import LlamaConfig

    if spec.rope_scaling is not None:
        raise ConfigError("demo models use plain RoPE; rope_scaling is not supported here")
    return LlamaConfig(hidden_size=spec.hidden, intermediate_size=256, num_hidden_layers=spec.num_layers,
                       num_attention_heads=spec.heads, num_key_value_heads=spec.heads, head_dim=spec.head_dim,
                       vocab_size=spec.vocab, rms_norm_eps=spec.norm_eps, tie_word_embeddings=spec.tie_embeddings,
                       max_position_embeddings=spec.max_position_embeddings, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
                       attn_implementation="sdpa")


def _shape_layer(block: nn.Module, lay: Layer, config, i: int) -> None:
    """Give decoder layer `i` its own attention (kv heads) and FFN (width), or no-ops."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    if lay.attention.kind is AttentionKind.FULL:
        cfg = copy.copy(config)
        cfg.num_key_value_heads = lay.attention.kv_heads
        block.self_attn = LlamaAttention(cfg, layer_idx=i)
    elif lay.attention.kind is AttentionKind.NOOP:
        block.self_attn, block.input_layernorm = SkipAttention(), nn.Identity()
    else:
        raise ConfigError(f"layer {i}: attention kind {lay.attention.kind.value!r} is not supported by the demo model")
    if lay.ffn.kind is FFNKind.SWIGLU:
        cfg = copy.copy(config)
        cfg.intermediate_size = lay.ffn.width
        block.mlp = LlamaMLP(cfg)
    elif lay.ffn.kind is FFNKind.NOOP:
        block.mlp, block.post_attention_layernorm = SkipMLP(), nn.Identity()
    else:
        raise ConfigError(f"layer {i}: FFN kind {lay.ffn.kind.value!r} is not supported by the demo model")


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """A float32 `LlamaForCausalLM` with per-layer shapes; seeded GPT-style init when `seed` is given."""
    from transformers import LlamaForCausalLM

    config = _config(spec)
    model = LlamaForCausalLM(config)
    for i, (block, lay) in enumerate(zip(model.model.layers, spec.layers)):
        _shape_layer(block, lay, config, i)
    if spec.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if seed is not None:
        init_weights(model, spec.num_layers, seed)
    return model.float().eval()


def init_weights(model: nn.Module, n_layers: int, seed: int) -> None:
    """Normal(0.02) everywhere, output projections scaled by 1/sqrt(2 n_layers), unit norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
                continue
            std = INIT_STD / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) \
                else INIT_STD
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def state_for_spec(model: nn.Module, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The model's parameters under the spec's HF names; fails if the two disagree on any tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    refs = model_tensors(spec)
    names = {r.hf_name for r in refs}
    extra = sorted(set(params) - names - ({"lm_head.weight"} if spec.tie_embeddings else set()))
    missing = sorted(names - set(params))
    if extra or missing:
        raise ConfigError(f"model and spec disagree: extra {extra}, missing {missing}")
    for r in refs:
        if tuple(params[r.hf_name].shape) != r.shape:
            raise ConfigError(f"tensor {r.hf_name}: model shape {list(params[r.hf_name].shape)}, spec {list(r.shape)}")
    return {r.hf_name: params[r.hf_name] for r in refs}


def write_checkpoint(model: nn.Module, spec: ModelSpec, directory: Path) -> int:
    """config.json + model.safetensors (spec dtype) + our transformers remote code into `directory`;
    returns weight bytes."""
    dtype = torch_dtype(spec.dtype)
    state = state_for_spec(model, spec)
    writer = HFCheckpointWriter(directory, [(n, dtype, tuple(t.shape)) for n, t in state.items()])
    for name, t in state.items():
        writer.write(name, t.detach().to(dtype).contiguous())
    writer.close()
    write_config(directory, spec.to_hf_config())
    install_remote_code(directory)
    return writer.total_bytes


def load_model(directory: str | Path) -> tuple[ModelSpec, nn.Module]:
    """(spec, float32 model) from a demo checkpoint, every tensor validated and filled exactly once."""
    spec = ModelSpec.load(directory)
    reader = CheckpointReader(directory)
    reader.validate(spec)
    model = build_model(spec)
    with torch.no_grad():
        for name, p in state_for_spec(model, spec).items():
            p.copy_(reader.get(name).float())
    reader.close()
    return spec, model


def logits_fn(model: nn.Module):
    return lambda ids: model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def sample(model: nn.Module, prompt: list[int], n: int, *, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0, eos_id: int | None = None) -> list[int]:
    """New token ids; full recompute per step (the demo model is tiny; this is for cards and tests)."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids.append(nxt)
        if nxt == eos_id:
            break
    return ids[len(prompt):]

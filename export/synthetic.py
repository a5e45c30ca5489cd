"""Random-weight checkpoints for any description: test fixtures and benchmark inputs.

Weights stream to disk one tensor at a time, so multi-GB synthetic models cost no more memory
than their largest tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from export import fp8
from export.io.output import output_dir
from export.io.safetensors_format import torch_dtype
from export.io.writer import HFCheckpointWriter, write_config, write_quant_config
from export.spec import ModelSpec
from export.tensors import Role, ScaleKind, is_fp8, model_tensors, scale_refs, stored_dtype

NORM_ROLES = {Role.ATTN_NORM, Role.FFN_NORM, Role.FINAL_NORM}


def random_tensor(role: Role, shape: tuple[int, ...], gen: torch.Generator, std: float) -> torch.Tensor:
    if role in NORM_ROLES:  # non-unit scales, so norm handling bugs are visible
        return 1.0 + 0.2 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * std


def write_random_checkpoint(path: str | Path, spec: ModelSpec, *, seed: int = 0,
                            std: float = 0.05, max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> Path:
    """A complete HF checkpoint (config.json + safetensors) for `spec` with seeded weights.

    `path` must be new, or a previous output of this toolkit replaced with `overwrite`."""
    gen = torch.Generator().manual_seed(seed)
    refs = model_tensors(spec)
    scales = scale_refs(spec)
    plan = [(r.hf_name, torch_dtype(stored_dtype(spec, r)), r.shape) for r in refs]
    plan += [(s.name, torch.float32, ()) for s in scales]
    planned = sum(_numel(shape) * dt.itemsize for _, dt, shape in plan)
    with output_dir(path, overwrite=overwrite, planned_bytes=planned) as tmp:
        writer = HFCheckpointWriter(tmp, plan, max_shard_bytes)
        weight_scales = {}
        for r in refs:
            t = random_tensor(r.role, r.shape, gen, std)
            if is_fp8(spec, r):  # ModelOpt's per-tensor recipe: scale = amax / 448
                weight_scales[(r.role, r.layer, r.branch)] = scale = fp8.scale_for(t.abs().max())
                writer.write(r.hf_name, fp8.quantize(t, scale))
            else:
                writer.write(r.hf_name, t.to(torch_dtype(spec.dtype)))
        for s in scales:  # activation and KV amaxes of a few units, as calibration finds them
            value = (weight_scales[(s.role, s.layer, s.branch)] if s.kind is ScaleKind.WEIGHT
                     else float(2.0 + 4.0 * torch.rand((), generator=gen)) / fp8.FP8_MAX)
            writer.write(s.name, torch.tensor(value, dtype=torch.float32))
        writer.close()
        write_config(tmp, spec.to_hf_config() if spec.architecture != "LlamaForCausalLM"
                     else llama_config(spec))
        write_quant_config(tmp, spec.quant)
    return Path(path)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llama_config(spec: ModelSpec) -> dict:
    """A plain `LlamaForCausalLM` config.json for a uniform description."""
    lay = spec.layers[0]
    assert all(x == lay for x in spec.layers), "a Llama config needs uniform layers"
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden, "num_attention_heads": spec.heads,
        "num_key_value_heads": lay.attention.kv_heads, "head_dim": spec.head_dim,
        "intermediate_size": lay.ffn.width, "num_hidden_layers": spec.num_layers,
        "vocab_size": spec.vocab, "hidden_act": "silu", "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling.to_hf() if spec.rope_scaling else None,
        "tie_word_embeddings": spec.tie_embeddings, "torch_dtype": spec.dtype,
        "max_position_embeddings": spec.max_position_embeddings,
        "attention_bias": False, "mlp_bias": False, **spec.passthrough,
    }

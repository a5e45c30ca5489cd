"""TRT-LLM tensor names by role: one table, and the packed tensor (qkv) as an ordered group.

Names follow `tensorrt_llm/models/nemotron_nas/convert.py`. `{i}` is the layer index local to the
pipeline stage. Note the swap TRT-LLM makes: `ffn.fc` is HF's gate_proj (the SiLU branch) and
`ffn.gate` is HF's up_proj. Nothing is pre-fused: `fused_fc` is made at build time.

FP8 (TRT-LLM 1.2.1 `FP8Linear` / `FP8RowLinear`, `quantization/layers.py`): each quantized linear
module `M` (its weight's name less `.weight`) also holds `M.weights_scaling_factor` and
`M.activation_scaling_factor`, shape (1,) float32; a packed tensor shares one pair. An attention
with an FP8 KV cache (`quantize.py kv_cache_quantize`) holds `attention.kv_cache_scaling_factor`
and `attention.kv_cache_rcp_scaling_factor`, shape (1,) float32. docs/fp8.md has the sources.
"""

from __future__ import annotations

from export.tensors import Role, ScaleKind

QKV = "transformer.layers.{i}.attention.qkv.weight"

TRTLLM_NAMES: dict[Role, str] = {
    Role.EMBED: "transformer.vocab_embedding.weight",
    Role.ATTN_NORM: "transformer.layers.{i}.input_layernorm.weight",
    Role.Q: QKV,
    Role.K: QKV,
    Role.V: QKV,
    Role.O: "transformer.layers.{i}.attention.dense.weight",
    Role.LINEAR_ATTN: "transformer.layers.{i}.attention.weight",
    Role.FFN_NORM: "transformer.layers.{i}.post_layernorm.weight",
    Role.GATE: "transformer.layers.{i}.ffn.fc.weight",
    Role.UP: "transformer.layers.{i}.ffn.gate.weight",
    Role.DOWN: "transformer.layers.{i}.ffn.proj.weight",
    Role.LINEAR_FFN: "transformer.layers.{i}.ffn.weight",
    Role.FINAL_NORM: "transformer.ln_f.weight",
    Role.LM_HEAD: "lm_head.weight",
}

# Tensors TRT-LLM stores packed: the parts, in row order, concatenated on dim 0 per rank.
PACKED: dict[str, tuple[Role, ...]] = {QKV: (Role.Q, Role.K, Role.V)}


# A quantized linear's per-tensor scales, as suffixes of its module name.
LINEAR_SCALE_SUFFIX: dict[ScaleKind, str] = {
    ScaleKind.WEIGHT: "weights_scaling_factor",  # HF ModelOpt weight_scale
    ScaleKind.INPUT: "activation_scaling_factor",  # HF ModelOpt input_scale
}
# An FP8 KV cache's scales: one pair per attention layer, read by the attention plugin as
# kv_quant_orig_scale (the scale) and kv_orig_quant_scale (its reciprocal).
KV_SCALE = "transformer.layers.{i}.attention.kv_cache_scaling_factor"
KV_RCP_SCALE = "transformer.layers.{i}.attention.kv_cache_rcp_scaling_factor"
KV_SCALES = (KV_SCALE, KV_RCP_SCALE)


def trtllm_module(role: Role, local_layer: int | None) -> str:
    """The TRT-LLM module a weight belongs to (`transformer.layers.0.attention.qkv`): what
    `exclude_modules` names and what the scale names hang off."""
    return trtllm_name(role, local_layer).removesuffix(".weight")


def trtllm_scale_name(kind: ScaleKind, role: Role, local_layer: int | None) -> str:
    """The rank-file name of a linear's scale; a K or V cache scale is the layer's one KV scale."""
    if kind in LINEAR_SCALE_SUFFIX:
        return f"{trtllm_module(role, local_layer)}.{LINEAR_SCALE_SUFFIX[kind]}"
    return KV_SCALE.format(i=local_layer)


def trtllm_name(role: Role, local_layer: int | None) -> str:
    template = TRTLLM_NAMES[role]
    if "{i}" in template and local_layer is None:
        raise KeyError(f"{role.value} needs a layer index")
    return template.format(i=local_layer)


def packed_parts(role: Role) -> tuple[Role, ...]:
    """The roles sharing `role`'s TRT-LLM tensor, in row order (just `role` when not packed)."""
    return PACKED.get(TRTLLM_NAMES[role], (role,))


def check_name_table() -> list[str]:
    """Every role has exactly one destination, and packed groups list exactly their roles."""
    problems = [f"role {r.value} has no TRT-LLM name" for r in Role if r not in TRTLLM_NAMES]
    for template in set(TRTLLM_NAMES.values()):
        users = tuple(r for r in Role if TRTLLM_NAMES.get(r) == template)
        if len(users) > 1 and set(PACKED.get(template, ())) != set(users):
            problems.append(f"{template} is the destination of {[r.value for r in users]} but is not packed")
    return problems

"""Which tensors a model description needs, by role, under HF names.

A `Role` is what a tensor does (q projection, FFN down projection, ...). The HF name table,
the TRT-LLM name table, the sharding rules and the runtime's parameters are all keyed by role,
so adding a layer kind means adding rows to tables, not branches to stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from export.quantization import FP8_DTYPE
from export.spec import AttentionKind, FFNKind, Layer, ModelSpec


class Role(StrEnum):
    EMBED = "embed"
    ATTN_NORM = "attn_norm"
    Q = "q"
    K = "k"
    V = "v"
    O = "o"  # noqa: E741 - the attention output projection
    LINEAR_ATTN = "linear_attn"
    FFN_NORM = "ffn_norm"
    GATE = "gate"
    UP = "up"
    DOWN = "down"
    LINEAR_FFN = "linear_ffn"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"


GLOBAL_ROLES = (Role.EMBED, Role.FINAL_NORM, Role.LM_HEAD)

# HF names, one row per role. `{l}` is the (global) layer index.
HF_NAMES: dict[Role, str] = {
    Role.EMBED: "model.embed_tokens.weight",
    Role.ATTN_NORM: "model.layers.{l}.input_layernorm.weight",
    Role.Q: "model.layers.{l}.self_attn.q_proj.weight",
    Role.K: "model.layers.{l}.self_attn.k_proj.weight",
    Role.V: "model.layers.{l}.self_attn.v_proj.weight",
    Role.O: "model.layers.{l}.self_attn.o_proj.weight",
    Role.LINEAR_ATTN: "model.layers.{l}.self_attn.linear_attn.weight",
    Role.FFN_NORM: "model.layers.{l}.post_attention_layernorm.weight",
    Role.GATE: "model.layers.{l}.mlp.gate_proj.weight",
    Role.UP: "model.layers.{l}.mlp.up_proj.weight",
    Role.DOWN: "model.layers.{l}.mlp.down_proj.weight",
    Role.LINEAR_FFN: "model.layers.{l}.mlp.linear_mlp.weight",
    Role.FINAL_NORM: "model.norm.weight",
    Role.LM_HEAD: "lm_head.weight",
}

# A tied model (`tie_word_embeddings`) stores no tensor for these roles: each is read from the
# role it names. Every reader, the planners and the runtime go through `TensorRef.alias`, so the
# tie is this one row, not a special case per stage.
TIED_ALIASES: dict[Role, Role] = {Role.LM_HEAD: Role.EMBED}

# Names found in HF checkpoints that carry no weight we need (recomputed at load time).
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# A Puzzletron `parallel_blocks` branch k of layer l keeps its tensors under this prefix
# (`DeciLMMultiDecoderLayer.parallel_blocks` in its modeling_decilm.py).
HF_BRANCH_PREFIX = "model.layers.{l}.parallel_blocks.{b}."


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the full (unsharded) model."""

    role: Role
    layer: int | None  # global layer index; None for embed / final norm / lm_head
    shape: tuple[int, ...]
    branch: int | None = None  # the parallel_blocks branch of `layer`, if any
    alias: Role | None = None  # a tied tensor: its bytes are this role's (`TIED_ALIASES`)

    @property
    def hf_name(self) -> str:
        """The name the bytes are stored under (the aliased role's, for a tied tensor)."""
        name = HF_NAMES[self.alias or self.role].format(l=self.layer)
        if self.branch is None:
            return name
        plain = f"model.layers.{self.layer}."
        return HF_BRANCH_PREFIX.format(l=self.layer, b=self.branch) + name.removeprefix(plain)

    def at(self, layer: int) -> TensorRef:
        """The same tensor of source layer `layer` (a copied layer's name in its source)."""
        return TensorRef(self.role, layer, self.shape, self.branch, self.alias)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def layer_roles(spec: ModelSpec, layer: int) -> list[tuple[Role, tuple[int, ...]]]:
    """The roles (and full shapes) a layer has; no-op sublayers have none, not even a norm.
    A parallel-blocks layer has none of its own: its branches' are `branch_roles`."""
    return _roles(spec, spec.layers[layer])


def branch_roles(spec: ModelSpec, layer: int) -> list[tuple[int, Role, tuple[int, ...]]]:
    """(branch, role, shape) of each parallel_blocks branch of `layer`, in branch order."""
    return [(k, role, shape) for k, b in enumerate(spec.layers[layer].branches) for role, shape in _roles(spec, b)]


def _roles(spec: ModelSpec, lay: Layer) -> list[tuple[Role, tuple[int, ...]]]:
    h, hd = spec.hidden, spec.head_dim
    out: list[tuple[Role, tuple[int, ...]]] = []
    if lay.attention.kind is AttentionKind.FULL:
        kv = lay.attention.kv_heads
        assert kv is not None
        out += [(Role.ATTN_NORM, (h,)), (Role.Q, (spec.heads * hd, h)), (Role.K, (kv * hd, h)),
                (Role.V, (kv * hd, h)), (Role.O, (h, spec.heads * hd))]
    elif lay.attention.kind is AttentionKind.LINEAR:
        out += [(Role.ATTN_NORM, (h,)), (Role.LINEAR_ATTN, (h, h))]
    if lay.ffn.kind is FFNKind.SWIGLU:
        w = lay.ffn.width
        assert w is not None
        gate = [(Role.GATE, (w, h))] if lay.ffn.gated else []  # a plain MLP has up and down only
        out += [(Role.FFN_NORM, (h,)), *gate, (Role.UP, (w, h)), (Role.DOWN, (h, w))]
    elif lay.ffn.kind is FFNKind.LINEAR:
        out += [(Role.FFN_NORM, (h,)), (Role.LINEAR_FFN, (h, h))]
    return out


def global_ref(spec: ModelSpec, role: Role) -> TensorRef:
    """The model-wide tensor `role` (embed, final norm, lm_head), aliased when the model ties it."""
    shapes = {Role.EMBED: (spec.vocab, spec.hidden), Role.FINAL_NORM: (spec.hidden,),
              Role.LM_HEAD: (spec.vocab, spec.hidden)}
    if role not in shapes:
        raise KeyError(f"{role.value} needs a layer index")
    return TensorRef(role, None, shapes[role], alias=TIED_ALIASES.get(role) if spec.tie_embeddings else None)


def tied_tensors(spec: ModelSpec) -> list[TensorRef]:
    """The tensors a tied model has no bytes for (each an alias of one it has)."""
    return [global_ref(spec, r) for r in TIED_ALIASES] if spec.tie_embeddings else []


def model_tensors(spec: ModelSpec) -> list[TensorRef]:
    """Every tensor the description needs, in checkpoint order (embed, layers, norm, head); a tied
    tensor is not one (`tied_tensors`)."""
    refs = [global_ref(spec, Role.EMBED)]
    for i in range(spec.num_layers):
        refs += [TensorRef(role, i, shape) for role, shape in layer_roles(spec, i)]
        refs += [TensorRef(role, i, shape, k) for k, role, shape in branch_roles(spec, i)]
    refs.append(global_ref(spec, Role.FINAL_NORM))
    head = global_ref(spec, Role.LM_HEAD)
    return refs if head.alias else [*refs, head]


def parameter_count(spec: ModelSpec) -> int:
    return sum(r.numel() for r in model_tensors(spec))


# ---- quantized tensors (ModelOpt per-tensor FP8: `export.quantization`) ----------------------
class ScaleKind(StrEnum):
    WEIGHT = "weight_scale"  # x_weight ~= weight_fp8 * weight_scale
    INPUT = "input_scale"  # the linear's input is quantized with it (static activation scale)
    K = "k_scale"  # FP8 KV cache: keys stored as k / k_scale
    V = "v_scale"


# The linears ModelOpt's FP8 recipe quantizes (every nn.Linear not in exclude_modules); the
# embedding and the norms are never quantized.
LINEAR_ROLES = frozenset({Role.Q, Role.K, Role.V, Role.O, Role.LINEAR_ATTN, Role.GATE, Role.UP, Role.DOWN,
                          Role.LINEAR_FFN, Role.LM_HEAD})


def module_name(ref: TensorRef) -> str:
    """The HF module a weight belongs to (`model.layers.3.mlp.down_proj`), by its own role, not
    its tied alias: what `exclude_modules` patterns match."""
    own = TensorRef(ref.role, ref.layer, ref.shape, ref.branch)
    return own.hf_name.removesuffix(".weight")


def is_fp8(spec: ModelSpec, ref: TensorRef) -> bool:
    """Is this tensor stored as float8_e4m3fn (with a weight and an input scale)?"""
    return (spec.quant.fp8 and ref.role in LINEAR_ROLES and ref.alias is None
            and not spec.quant.excludes(module_name(ref)))


def stored_dtype(spec: ModelSpec, ref: TensorRef) -> str:
    """The dtype a checkpoint stores `ref` in (canonical name, as `ModelSpec.dtype`)."""
    return FP8_DTYPE if is_fp8(spec, ref) else spec.dtype


@dataclass(frozen=True)
class ScaleRef:
    """One per-tensor scale: of a quantized linear (`role` its weight's role), or an attention
    layer's k / v cache scale (`role` K or V)."""

    kind: ScaleKind
    role: Role
    layer: int | None
    branch: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The names it may be stored under, the one we write first. KV scales: ModelOpt's
        (`self_attn.k_proj.k_scale`), then vLLM's own (`self_attn.attn.k_scale`, `self_attn.k_scale`)."""
        module = module_name(TensorRef(self.role, self.layer, (), self.branch))
        if self.kind in (ScaleKind.WEIGHT, ScaleKind.INPUT):
            return (f"{module}.{self.kind.value}",)
        attn = module.rsplit(".", 1)[0]
        return (f"{module}.{self.kind.value}", f"{attn}.attn.{self.kind.value}", f"{attn}.{self.kind.value}")

    @property
    def name(self) -> str:
        return self.names[0]

    def where(self) -> str:
        at = "the model" if self.layer is None else f"layer {self.layer}"
        return at + (f" parallel_blocks.{self.branch}" if self.branch is not None else "")


def scale_refs(spec: ModelSpec) -> list[ScaleRef]:
    """Every scale the description needs, in checkpoint order: weight and input scale of each FP8
    linear, then (FP8 KV cache) k and v scales of each full-attention layer or branch."""
    out: list[ScaleRef] = []
    for ref in model_tensors(spec):
        if is_fp8(spec, ref):
            out += [ScaleRef(ScaleKind.WEIGHT, ref.role, ref.layer, ref.branch),
                    ScaleRef(ScaleKind.INPUT, ref.role, ref.layer, ref.branch)]
        if spec.quant.fp8_kv and ref.role is Role.V:  # one pair per attention (layer, branch)
            out += [ScaleRef(ScaleKind.K, Role.K, ref.layer, ref.branch),
                    ScaleRef(ScaleKind.V, Role.V, ref.layer, ref.branch)]
    return out


def kv_scale_names(spec: ModelSpec) -> set[str]:
    """Every name a k/v cache scale of this model may have: a checkpoint without an FP8 KV cache
    may still carry them (ModelOpt exports them when it calibrated the KV cache); they are read
    then only when the cache is FP8."""
    out: set[str] = set()
    for ref in model_tensors(spec):
        if ref.role is Role.V:
            for kind, role in ((ScaleKind.K, Role.K), (ScaleKind.V, Role.V)):
                out.update(ScaleRef(kind, role, ref.layer, ref.branch).names)
    return out

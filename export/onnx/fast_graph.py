"""The decoder as an ONNX Runtime graph with its fused contrib operators, over the engine's own weights.

`graph.py` writes the portable graph (standard opset-17 ops, stateless past in / present out) that
TensorRT's parser and any ORT provider accept. On ORT's CPU provider that graph pays per step for
what it states: the past concatenated into a new present every step, RoPE as a dozen small ops per
layer, residual add and RMS norm as separate kernels. This module states the same model the way
onnxruntime-genai's model builder does for Llama, so ORT runs each piece as one kernel:

- `GroupQueryAttention` (com.microsoft) per full-attention layer on the packed qkv projection, with
  the rotary inside it (`do_rotary`, cos/sin cache constants) and its KV cache a buffer the caller
  preallocates, [batch, kv_i, capacity, hd], bound as both past and present (the op writes only the
  new rows in place: nothing is copied per step). Lengths come as `seqlens_k` (tokens after the
  step, minus one) and `query_seqlens` (valid rows of the right-padded chunk), so a ragged batch
  prefills and decodes in one call and an entry with `query_seqlens = 0` is left untouched;
- `SkipSimplifiedLayerNormalization` for every residual add followed by the next sublayer's norm.

It is built in memory from `ModelSpec` alone and names the same initializers as `graph.py`: they
are copied (as external-data references) from the engine's model.onnx, so both graphs read the one
model.onnx.data and nothing new is written. Heterogeneous layers are what `graph.py` makes of them:
per-layer kv heads are each node's attributes, no-op sublayers emit nothing, linear replacements
are one MatMul, parallel blocks were widened into one FFN when the engine was built.

    inputs : input_ids [batch, seq] int64, seqlens_k [batch] int32, total_sequence_length [] int32,
             query_seqlens [batch] int32, logit_index [batch, keep] int64 (the chunk rows whose logits
             are wanted: a prefill needs its last token's only, so lm_head runs on `keep` rows),
             past_key_values.{i}.key/value [batch, kv_i, capacity, hd]
    outputs: logits [batch, keep, vocab], present.{i}.key/value (the same buffers as the past)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper

from export import rope
from export.errors import ExportError
from export.onnx.graph import IR_VERSION, OPSET, Graph, kv_names
from export.spec import AttentionKind, FFNKind, ModelSpec
from export.tensors import Role

MS_DOMAIN = "com.microsoft"
HEAD_DIM_MULTIPLE = 16  # ORT's CPU GroupQueryAttention refuses other head sizes at run time


def rotary_cache(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position_embeddings, head_dim / 2] in fp32, as `rope.cos_sin` computes them."""
    positions = torch.arange(spec.max_position_embeddings, dtype=torch.float32)
    angles = positions[:, None] * rope.inv_freq(spec)
    return angles.cos().numpy(), angles.sin().numpy()


class FastDecoderGraph:
    """Emits the fused graph; `weights` is the engine graph's initializer table (name -> proto)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, TensorProto], where: str) -> None:
        self.spec, self.weights, self.where = spec, weights, where
        self.g = Graph(data=None, on_bytes=lambda n: None)  # type: ignore[arg-type]  # no weight is written
        self._used: set[str] = set()
        self.cos = self.sin = ""

    def w(self, name: str, shape: tuple[int, ...]) -> str:
        """The engine's initializer `name`, checked against the shape this graph needs."""
        proto = self.weights.get(name)
        if proto is None:
            raise ExportError(f"{self.where}: initializer {name!r} is missing (rebuild with `build --onnx`)")
        if tuple(proto.dims) != shape or proto.data_type != TensorProto.FLOAT:
            raise ExportError(f"{self.where}: initializer {name!r} is {list(proto.dims)}, "
                              f"the model's config needs fp32 {list(shape)}")
        if name not in self._used:
            self._used.add(name)
            self.g.initializers.append(proto)
        return name

    # ---- norms and the residual stream -----------------------------------------------------------
    def norm_weight(self, role: Role, layer: int | None) -> str:
        return self.w(f"layers.{layer}.{role.value}" if layer is not None else role.value, (self.spec.hidden,))

    def residual_norm(self, h: str, pending: str | None, role: Role, layer: int | None) -> tuple[str, str]:
        """(normed input of the next sublayer, the residual stream after adding `pending`)."""
        g, eps, w = self.g, self.spec.norm_eps, self.norm_weight(role, layer)
        if pending is None:
            return g.op("SimplifiedLayerNormalization", h, w, axis=-1, epsilon=eps, stash_type=1), h
        x, _, _, total = g.op("SkipSimplifiedLayerNormalization", h, pending, w, n_out=4, epsilon=eps,
                              domain=MS_DOMAIN)
        return x, total

    # ---- sublayers (x is already normed) -----------------------------------------------------------
    def attention(self, i: int, x: str) -> str:
        g, s = self.g, self.spec
        heads, hd, kv = s.heads, s.head_dim, int(s.layers[i].attention.kv_heads or 0)
        qkv = g.op("MatMul", x, self.w(f"layers.{i}.attn.qkv", (s.hidden, (heads + 2 * kv) * hd)))
        past_k, past_v, present_k, present_v = kv_names(i)
        inputs = [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", self.cos, self.sin,
                  *[""] * 7, "query_seqlens"]
        out, _, _ = g.op("GroupQueryAttention", *inputs, n_out=3, domain=MS_DOMAIN, num_heads=heads,
                         kv_num_heads=kv, do_rotary=1, rotary_interleaved=0, scale=1.0 / math.sqrt(hd))
        g.nodes[-1].output[1:] = [present_k, present_v]
        return g.op("MatMul", out, self.w(f"layers.{i}.attn.o", (heads * hd, s.hidden)))

    def linear_attention(self, i: int, x: str) -> str:
        return self.g.op("MatMul", x, self.w(f"layers.{i}.attn.linear", (self.spec.hidden, self.spec.hidden)))

    def swiglu(self, i: int, x: str) -> str:
        g, hidden, width = self.g, self.spec.hidden, int(self.spec.layers[i].ffn.width or 0)
        down = self.w(f"layers.{i}.ffn.down", (width, hidden))
        if not self.spec.layers[i].ffn.gated:
            up = g.op("MatMul", x, self.w(f"layers.{i}.ffn.up", (hidden, width)))
            return g.op("MatMul", g.op("Mul", up, g.op("Sigmoid", up)), down)
        gate_up = g.op("MatMul", x, self.w(f"layers.{i}.ffn.gate_up", (hidden, 2 * width)))
        gate, up = g.op("Split", gate_up, g.const([width, width]), axis=-1, n_out=2)
        return g.op("MatMul", g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), down)

    def linear_ffn(self, i: int, x: str) -> str:
        return self.g.op("MatMul", x, self.w(f"layers.{i}.ffn.linear", (self.spec.hidden, self.spec.hidden)))

    # ---- the whole model ---------------------------------------------------------------------------
    def sublayers(self) -> list[tuple[int, Role, Any]]:
        """(layer, its norm's role, emitter) for every sublayer that computes something, in order."""
        out = []
        for i, lay in enumerate(self.spec.layers):
            if lay.branches:  # the engine graph has them widened; a spec that still has them is not its config
                raise ExportError(f"{self.where}: layer {i} is a parallel_blocks layer; the fast ONNX graph runs "
                                  f"the engine's widened config (rebuild with `build --onnx`)")
            attn, ffn = ATTENTION[lay.attention.kind], FFN_IMPL[lay.ffn.kind]
            out += [(i, Role.ATTN_NORM, attn)] if attn else []
            out += [(i, Role.FFN_NORM, ffn)] if ffn else []
        return out

    def build(self) -> ModelProto:
        g, spec = self.g, self.spec
        if spec.attention_layers() and spec.head_dim % HEAD_DIM_MULTIPLE:
            raise ExportError(f"{self.where}: head_dim {spec.head_dim} is not a multiple of {HEAD_DIM_MULTIPLE}, "
                              f"which ORT's CPU GroupQueryAttention needs; use runtime 'onnx'")
        cos, sin = rotary_cache(spec)
        self.cos, self.sin = g.const(cos, np.float32), g.const(sin, np.float32)
        g.scope = "embed"
        h = g.op("Gather", self.w("embed", (spec.vocab, spec.hidden)), "input_ids", axis=0)
        pending: str | None = None
        for i, role, emit in self.sublayers():
            g.scope = f"layers.{i}"
            x, h = self.residual_norm(h, pending, role, i)
            pending = emit(self, i, x)
        g.scope = "head"
        x, _ = self.residual_norm(h, pending, Role.FINAL_NORM, None)
        kept = g.op("GatherND", x, g.op("Unsqueeze", "logit_index", g.const([-1])), batch_dims=1)  # [B, keep, H]
        g.op("MatMul", kept, self.w("lm_head", (spec.hidden, spec.vocab)), out="logits")
        graph = helper.make_graph(g.nodes, "decoder_fast", self.inputs(), self.outputs(), initializer=g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="ffn-fusion-export")
        model.ir_version = IR_VERSION
        return model

    def inputs(self) -> list[Any]:
        vi = helper.make_tensor_value_info
        out = [vi("input_ids", TensorProto.INT64, ["batch", "seq"]),
               vi("seqlens_k", TensorProto.INT32, ["batch"]),
               vi("total_sequence_length", TensorProto.INT32, []),
               vi("query_seqlens", TensorProto.INT32, ["batch"]),
               vi("logit_index", TensorProto.INT64, ["batch", "keep"])]
        return out + self._kv(0)

    def outputs(self) -> list[Any]:
        vi = helper.make_tensor_value_info
        return [vi("logits", TensorProto.FLOAT, ["batch", "keep", self.spec.vocab]), *self._kv(2)]

    def _kv(self, first: int) -> list[Any]:
        vi, hd = helper.make_tensor_value_info, self.spec.head_dim
        return [vi(n, TensorProto.FLOAT, ["batch", int(self.spec.layers[i].attention.kv_heads or 0), "capacity", hd])
                for i in self.spec.attention_layers() for n in kv_names(i)[first:first + 2]]


ATTENTION = {AttentionKind.FULL: FastDecoderGraph.attention, AttentionKind.LINEAR: FastDecoderGraph.linear_attention,
             AttentionKind.NOOP: None}
FFN_IMPL = {FFNKind.SWIGLU: FastDecoderGraph.swiglu, FFNKind.LINEAR: FastDecoderGraph.linear_ffn, FFNKind.NOOP: None}

"""The decoder as an ONNX graph (opset 17), built node by node from the `ModelSpec`.

Built with `onnx.helper` rather than `torch.onnx.export` because (1) weights stream: each
initializer is written to external data as it is read, so the export never holds the model,
where torch.onnx.export needs the whole module in memory; (2) the structure is ours to state:
KV inputs/outputs exist only for full-attention layers, gate/up (and q/k/v) are one MatMul, and
only standard opset-17 ops are used, which TensorRT's ONNX parser and ORT's providers accept;
(3) the dynamo exporter needs onnxscript, which this toolkit does not ship.

The math is the runtime's `Decoder` (export/runtime/model.py) at tp = 1, in fp32:

    inputs : input_ids [batch, seq], position_ids [batch, seq], attention_mask [batch, total_seq]
             (1 = a real key: past then new), past_key_values.{i}.key/value [batch, kv_i, past_seq, hd]
    outputs: logits [batch, seq, vocab], present.{i}.key/value [batch, kv_i, total_seq, hd]

for full-attention layers i only. Keys j are visible to query t when attention_mask[j] = 1 and
j <= past_seq + t, so ragged batches work with padding anywhere a mask says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from export import rope
from export.engine_dir import ONNX_MODEL
from export.onnx.external import ExternalData
from export.rank_weights import RankWeights
from export.spec import AttentionKind, FFNKind, ModelSpec
from export.tensors import Role

OPSET = 17
IR_VERSION = 8  # what TensorRT 8.6+/10 and ORT >= 1.14 all read
MODEL_FILE = ONNX_MODEL
DATA_FILE = "model.onnx.data"
NEG = -1e30  # additive mask: exp() of it is exactly 0 in fp32, with no inf - inf
BLOCK_BYTES = 64 << 20  # bytes per streamed row block of one initializer

Refs = tuple[tuple[Role, int | None], ...]


def kv_names(i: int) -> tuple[str, str, str, str]:
    """past key, past value, present key, present value of layer i."""
    return (f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value")


def _rows(tensors: list[torch.Tensor], transpose: bool) -> Iterator[np.ndarray]:
    """Row blocks of cat([t.T ...], dim=1) (transpose) or of t (one tensor), as fp32 numpy."""
    if not transpose:
        (t,) = tensors
        step = max(1, BLOCK_BYTES // max(1, 4 * t[0].numel()))
        for r in range(0, t.shape[0], step):
            yield t[r:r + step].float().numpy()
        return
    width = sum(t.shape[0] for t in tensors)
    step = max(1, BLOCK_BYTES // (4 * width))
    for r in range(0, tensors[0].shape[1], step):
        yield torch.cat([t[:, r:r + step].float().T for t in tensors], dim=1).contiguous().numpy()


class Graph:
    """Nodes, small constants and external initializers; outputs are named `scope/Op_n`."""

    def __init__(self, data: ExternalData, on_bytes: Callable[[int], object]) -> None:
        self.data, self.on_bytes = data, on_bytes
        self.nodes: list[Any] = []
        self.initializers: list[TensorProto] = []
        self.scope = "model"
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, n_out: int = 1, out: str | None = None, **attrs: Any) -> Any:
        self._count += 1
        name = f"{self.scope}/{op_type}_{self._count}"
        outs = [out] if out else [name if n_out == 1 else f"{name}:{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else tuple(outs)

    def const(self, value: Any, dtype: type = np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, tensors: list[torch.Tensor], transpose: bool) -> str:
        """An fp32 initializer in external data: the tensor, or [in, sum(out)] of nn.Linear weights."""
        shape = (tensors[0].shape[1], sum(t.shape[0] for t in tensors)) if transpose else tuple(tensors[0].shape)
        self.initializers.append(self.data.add(name, shape, np.dtype(np.float32), _rows(tensors, transpose)))
        self.on_bytes(4 * math.prod(shape))
        return name


class DecoderGraph:
    """Emits the decoder: shared RoPE tables and mask, then per-layer sublayers by kind."""

    def __init__(self, spec: ModelSpec, weights: RankWeights, data: ExternalData,
                 on_bytes: Callable[[int], object] = lambda n: None) -> None:
        spec.refuse_unsupported("the ONNX export", plain_mlp=False)
        self.spec, self.weights = spec, weights
        self.g = Graph(data, on_bytes)
        self.cos = self.sin = self.bias = ""
        self._group_bias: dict[int, str] = {}

    # ---- weights -------------------------------------------------------------------------
    def linear(self, name: str, *refs: tuple[Role, int | None]) -> str:
        """MatMul right operand [in, out]: nn.Linear weights transposed, concatenated along out."""
        return self.g.weight(name, [self.weights.get(role, layer) for role, layer in refs], transpose=True)

    def plain(self, name: str, role: Role, layer: int | None = None) -> str:
        return self.g.weight(name, [self.weights.get(role, layer)], transpose=False)

    # ---- building blocks -------------------------------------------------------------------
    def norm(self, x: str, role: Role, layer: int | None) -> str:
        g = self.g
        w = self.plain(f"layers.{layer}.{role.value}" if layer is not None else role.value, role, layer)
        var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        rms = g.op("Sqrt", g.op("Add", var, g.const(self.spec.norm_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, rms), w)

    def rotate(self, x: str) -> str:
        """neox RoPE on [B, T, heads, hd]: x * cos + rotate_half(x) * sin."""
        g, half = self.g, self.spec.head_dim // 2
        x1, x2 = g.op("Split", x, g.const([half, half]), axis=-1, n_out=2)
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, self.cos), g.op("Mul", rot, self.sin))

    def shared(self) -> None:
        """cos/sin [B, T, 1, hd] from position_ids, and the additive mask [B, 1, T, S]."""
        g = self.g
        g.scope = "shared"
        pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([2]))
        angles = g.op("Mul", pos, g.const(rope.inv_freq(self.spec).numpy(), np.float32))
        emb = g.op("Concat", angles, angles, axis=-1)
        self.cos = g.op("Unsqueeze", g.op("Cos", emb), g.const([2]))
        self.sin = g.op("Unsqueeze", g.op("Sin", emb), g.const([2]))
        t = g.op("Gather", g.op("Shape", "input_ids"), g.const(1), axis=0)
        s = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0)
        zero, one = g.const(0), g.const(1)
        keys = g.op("Unsqueeze", g.op("Range", zero, s, one), g.const([0]))  # [1, S]
        queries = g.op("Add", g.op("Range", zero, t, one), g.op("Sub", s, t))  # past_len + t
        causal = g.op("LessOrEqual", keys, g.op("Unsqueeze", queries, g.const([1])))  # [T, S]
        valid = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1]))  # [B, 1, S]
        bias = g.op("Where", g.op("And", causal, valid), g.const(0.0, np.float32), g.const(NEG, np.float32))
        self.bias = g.op("Unsqueeze", bias, g.const([1]))  # [B, 1, T, S]

    def group_bias(self, grp: int) -> str:
        """The mask for grp query heads stacked per kv head: [B, 1, grp*T, S] (built once per grp)."""
        if grp not in self._group_bias:
            scope, self.g.scope = self.g.scope, "shared"
            self._group_bias[grp] = self.g.op("Tile", self.bias, self.g.const([1, 1, grp, 1]))
            self.g.scope = scope
        return self._group_bias[grp]

    # ---- sublayers -------------------------------------------------------------------------
    def attention(self, i: int, h: str) -> str:
        g, s = self.g, self.spec
        heads, hd, kv = s.heads, s.head_dim, s.layers[i].attention.kv_heads
        assert kv is not None
        x = self.norm(h, Role.ATTN_NORM, i)
        qkv = g.op("MatMul", x, self.linear(f"layers.{i}.attn.qkv", (Role.Q, i), (Role.K, i), (Role.V, i)))
        q, k, v = g.op("Split", qkv, g.const([heads * hd, kv * hd, kv * hd]), axis=-1, n_out=3)
        q = self.rotate(g.op("Reshape", q, g.const([0, 0, heads, hd])))
        grp = heads // kv
        q = g.op("Transpose", g.op("Reshape", q, g.const([0, 0, kv, grp, hd])), perm=[0, 2, 3, 1, 4])
        q = g.op("Reshape", q, g.const([0, 0, -1, hd]))  # [B, kv, grp*T, hd]: a query group per kv head
        k = g.op("Transpose", self.rotate(g.op("Reshape", k, g.const([0, 0, kv, hd]))), perm=[0, 2, 1, 3])
        v = g.op("Transpose", g.op("Reshape", v, g.const([0, 0, kv, hd])), perm=[0, 2, 1, 3])
        past_k, past_v, present_k, present_v = kv_names(i)
        keys = g.op("Concat", past_k, k, axis=2, out=present_k)  # [B, kv, S, hd]
        values = g.op("Concat", past_v, v, axis=2, out=present_v)
        kt = g.op("Transpose", keys, perm=[0, 1, 3, 2])  # [B, kv, hd, S]
        scores = g.op("Mul", g.op("MatMul", q, kt), g.const(1.0 / math.sqrt(hd), np.float32))  # [B, kv, grp*T, S]
        probs = g.op("Softmax", g.op("Add", scores, self.group_bias(grp)), axis=-1)
        out = g.op("Reshape", g.op("MatMul", probs, values), g.const([0, 0, grp, -1, hd]))  # [B, kv, grp, T, hd]
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 3, 1, 2, 4]), g.const([0, 0, heads * hd]))
        return g.op("MatMul", out, self.linear(f"layers.{i}.attn.o", (Role.O, i)))

    def linear_attention(self, i: int, h: str) -> str:
        x = self.norm(h, Role.ATTN_NORM, i)
        return self.g.op("MatMul", x, self.linear(f"layers.{i}.attn.linear", (Role.LINEAR_ATTN, i)))

    def swiglu(self, i: int, h: str) -> str:
        """One gate/up MatMul and one down MatMul, however wide (a fused FFN is just wider)."""
        g, width = self.g, self.spec.layers[i].ffn.width
        x = self.norm(h, Role.FFN_NORM, i)
        if not self.spec.layers[i].ffn.gated:  # Puzzletron's `gated: false`: down(silu(up(x)))
            up = g.op("MatMul", x, self.linear(f"layers.{i}.ffn.up", (Role.UP, i)))
            act = g.op("Mul", up, g.op("Sigmoid", up))
            return g.op("MatMul", act, self.linear(f"layers.{i}.ffn.down", (Role.DOWN, i)))
        gate_up = g.op("MatMul", x, self.linear(f"layers.{i}.ffn.gate_up", (Role.GATE, i), (Role.UP, i)))
        gate, up = g.op("Split", gate_up, g.const([width, width]), axis=-1, n_out=2)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        return g.op("MatMul", act, self.linear(f"layers.{i}.ffn.down", (Role.DOWN, i)))

    def linear_ffn(self, i: int, h: str) -> str:
        x = self.norm(h, Role.FFN_NORM, i)
        return self.g.op("MatMul", x, self.linear(f"layers.{i}.ffn.linear", (Role.LINEAR_FFN, i)))

    # ---- the whole model -------------------------------------------------------------------
    def build(self) -> GraphProto:
        g, spec = self.g, self.spec
        if spec.attention_layers():
            self.shared()
        g.scope = "embed"
        h = g.op("Gather", self.plain("embed", Role.EMBED), "input_ids", axis=0)
        for i, lay in enumerate(spec.layers):
            g.scope = f"layers.{i}"
            for fn in (ATTENTION[lay.attention.kind], FFN_IMPL[lay.ffn.kind]):
                if fn is not None:
                    h = g.op("Add", h, fn(self, i, h))
        g.scope = "head"
        x = self.norm(h, Role.FINAL_NORM, None)
        g.op("MatMul", x, self.lm_head(), out="logits")
        return helper.make_graph(g.nodes, "decoder", self.inputs(), self.outputs(), initializer=g.initializers)

    def lm_head(self) -> str:
        """[hidden, vocab], written transposed (rows beyond vocab cut); a tied model's reads the embedding."""
        t = self.weights.get(Role.LM_HEAD)
        return self.g.weight("lm_head", [t[:self.spec.vocab]], transpose=True)

    def inputs(self) -> list[Any]:
        vi = helper.make_tensor_value_info
        out = [vi("input_ids", TensorProto.INT64, ["batch", "seq"]),
               vi("position_ids", TensorProto.INT64, ["batch", "seq"]),
               vi("attention_mask", TensorProto.INT64, ["batch", "total_seq"])]
        for i in self.spec.attention_layers():
            kv = self.spec.layers[i].attention.kv_heads
            out += [vi(n, TensorProto.FLOAT, ["batch", kv, "past_seq", self.spec.head_dim]) for n in kv_names(i)[:2]]
        return out

    def outputs(self) -> list[Any]:
        vi = helper.make_tensor_value_info
        out = [vi("logits", TensorProto.FLOAT, ["batch", "seq", self.spec.vocab])]
        for i in self.spec.attention_layers():
            kv = self.spec.layers[i].attention.kv_heads
            out += [vi(n, TensorProto.FLOAT, ["batch", kv, "total_seq", self.spec.head_dim]) for n in kv_names(i)[2:]]
        return out


ATTENTION: dict[AttentionKind, Callable[[DecoderGraph, int, str], str] | None] = {
    AttentionKind.FULL: DecoderGraph.attention,
    AttentionKind.LINEAR: DecoderGraph.linear_attention,
    AttentionKind.NOOP: None,  # no tensors, no node, no KV input: the graph shows the saving
}
FFN_IMPL: dict[FFNKind, Callable[[DecoderGraph, int, str], str] | None] = {
    FFNKind.SWIGLU: DecoderGraph.swiglu,
    FFNKind.LINEAR: DecoderGraph.linear_ffn,
    FFNKind.NOOP: None,
}


def build_model(spec: ModelSpec, weights: RankWeights, data: ExternalData,
                on_bytes: Callable[[int], object] = lambda n: None) -> ModelProto:
    """The whole decoder as a ModelProto whose initializers live in `data`."""
    graph = DecoderGraph(spec, weights, data, on_bytes).build()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ffn-fusion-export")
    model.ir_version = IR_VERSION
    return model

"""Microbenchmark: ORT's GroupQueryAttention vs decode attention in standard ops, one layer, one token.

Dims of the demo puzzle model (8 q heads, 2 kv heads, head_dim 32, rotary), a preallocated cache
[n, kv, capacity, hd] bound in place. The standard-op graph ropes q and the new k with
com.microsoft.RotaryEmbedding, scores the 4 q heads sharing a kv head as one M=4 FusedMatMul over
the whole capacity (additive mask from the lengths), concatenates the new token's own score,
Softmax, MatMul with V plus the new token's term; the new k/v come out as outputs and are written
into the cache from numpy after the run (timed with it), so nothing copies the cache per step.

    .venv/bin/python scripts/bench_decode_attention.py [--runs 2000] [--capacity 256] [--context 160]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HEADS, KV, HD, CAP, CTX, MAXPOS = 8, 2, 32, 256, 160, 1024
GROUP = HEADS // KV
MS = "com.microsoft"


def rotary() -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000.0 ** (np.arange(0, HD, 2, dtype=np.float32) / HD))
    ang = np.arange(MAXPOS, dtype=np.float32)[:, None] * inv
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def model(nodes: list, inputs: list, outputs: list, inits: list) -> bytes:
    g = helper.make_graph(nodes, "attn", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m.SerializeToString()


def vi(name: str, dtype: int, shape: list) -> object:
    return helper.make_tensor_value_info(name, dtype, shape)


def gqa_model() -> bytes:
    cos, sin = rotary()
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seqlens_k", "total", "cos", "sin",
                                                    *[""] * 7, "qlens"], ["out", "pk_out", "pv_out"], domain=MS,
                            num_heads=HEADS, kv_num_heads=KV, do_rotary=1, rotary_interleaved=0,
                            scale=1.0 / math.sqrt(HD))
    kv = ["n", KV, "cap", HD]
    return model([node], [vi("qkv", TensorProto.FLOAT, ["n", 1, (HEADS + 2 * KV) * HD]), vi("pk", 1, kv),
                          vi("pv", 1, kv), vi("seqlens_k", 6, ["n"]), vi("total", 6, []), vi("qlens", 6, ["n"])],
                 [vi("out", 1, ["n", 1, HEADS * HD]), vi("pk_out", 1, kv), vi("pv_out", 1, kv)],
                 [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")])


def std_model() -> bytes:
    """past length `pos` [n] int64 (the new token's position); mask computed in-graph from it."""
    cos, sin = rotary()
    c = {"cos": cos, "sin": sin, "split": np.array([HEADS * HD, KV * HD, KV * HD], np.int64),
         "qshape": np.array([0, KV, GROUP, HD], np.int64), "kvshape": np.array([0, KV, 1, HD], np.int64),
         "oshape": np.array([0, 1, HEADS * HD], np.int64), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
         "ax1": np.array([1], np.int64), "neg": np.array(-1e30, np.float32),
         "zf": np.array(0.0, np.float32), "cap_split": np.array([CAP, 1], np.int64)}
    N = helper.make_node
    nodes = [
        N("Split", ["qkv", "split"], ["q0", "k0", "v0"], axis=-1),
        N("Unsqueeze", ["pos", "ax1"], ["pos2"]),  # [n, 1] position ids
        N("RotaryEmbedding", ["q0", "pos2", "cos", "sin"], ["q1"], domain=MS, num_heads=HEADS, interleaved=0),
        N("RotaryEmbedding", ["k0", "pos2", "cos", "sin"], ["k1"], domain=MS, num_heads=KV, interleaved=0),
        N("Reshape", ["q1", "qshape"], ["q"]),                       # [n, kv, 4, hd] (q head = kv*4 + j)
        N("Reshape", ["k1", "kvshape"], ["knew"]),                   # [n, kv, 1, hd]
        N("Reshape", ["v0", "kvshape"], ["vnew"]),
        # additive mask [n, 1, 1, cap]: 0 where slot < pos, -1e30 beyond
        N("Shape", ["pk"], ["pkshape"], start=2, end=3),
        N("Squeeze", ["pkshape"], ["capn"]),
        N("Range", ["zero", "capn", "one"], ["ar"]),
        N("Less", ["ar", "pos2"], ["valid"]),                        # [n, cap]
        N("Where", ["valid", "zf", "neg"], ["m2"]),
        N("Unsqueeze", ["m2", "ax1"], ["m3"]),
        N("Unsqueeze", ["m3", "ax1"], ["mask"]),                     # [n, 1, 1, cap]
        N("FusedMatMul", ["q", "pk"], ["s"], domain=MS, transB=1, alpha=1.0 / math.sqrt(HD)),  # [n, kv, 4, cap]
        N("Add", ["s", "mask"], ["sm"]),
        N("FusedMatMul", ["q", "knew"], ["snew"], domain=MS, transB=1, alpha=1.0 / math.sqrt(HD)),  # [n,kv,4,1]
        N("Concat", ["sm", "snew"], ["sall"], axis=-1),
        N("Softmax", ["sall"], ["p"], axis=-1),
        N("Split", ["p", "cap_split"], ["pc", "pn"], axis=-1),
        N("MatMul", ["pc", "pv"], ["o1"]),                           # [n, kv, 4, hd]
        N("Mul", ["pn", "vnew"], ["o2"]),
        N("Add", ["o1", "o2"], ["o"]),
        N("Reshape", ["o", "oshape"], ["out"]),
    ]
    kv = ["n", KV, CAP, HD]
    return model(nodes, [vi("qkv", 1, ["n", 1, (HEADS + 2 * KV) * HD]), vi("pk", 1, kv), vi("pv", 1, kv),
                         vi("pos", 7, ["n"])],
                 [vi("out", 1, ["n", 1, HEADS * HD]), vi("knew", 1, ["n", KV, 1, HD]), vi("vnew", 1, ["n", KV, 1, HD])],
                 [numpy_helper.from_array(v, k) for k, v in c.items()])


def lean_model() -> bytes:
    """The per-layer part only, as a whole graph would have it: position ids [n, 1] and the additive
    mask [n, 1, 1, cap] come in (computed once per step for all layers), q and k roped as one tensor."""
    cos, sin = rotary()
    c = {"cos": cos, "sin": sin, "split": np.array([(HEADS + KV) * HD, KV * HD], np.int64),
         "split_qk": np.array([HEADS * HD, KV * HD], np.int64),
         "qshape": np.array([0, KV, GROUP, HD], np.int64), "kvshape": np.array([0, KV, 1, HD], np.int64),
         "oshape": np.array([0, 1, HEADS * HD], np.int64), "cap_split": np.array([CAP, 1], np.int64)}
    N = helper.make_node
    nodes = [
        N("Split", ["qkv", "split"], ["qk0", "v0"], axis=-1),
        N("RotaryEmbedding", ["qk0", "pos2", "cos", "sin"], ["qk1"], domain=MS, num_heads=HEADS + KV, interleaved=0),
        N("Split", ["qk1", "split_qk"], ["q1", "k1"], axis=-1),
        N("Reshape", ["q1", "qshape"], ["q"]),
        N("Reshape", ["k1", "kvshape"], ["knew"]),
        N("Reshape", ["v0", "kvshape"], ["vnew"]),
        N("FusedMatMul", ["q", "pk"], ["s"], domain=MS, transB=1, alpha=1.0 / math.sqrt(HD)),
        N("Add", ["s", "mask"], ["sm"]),
        N("FusedMatMul", ["q", "knew"], ["snew"], domain=MS, transB=1, alpha=1.0 / math.sqrt(HD)),
        N("Concat", ["sm", "snew"], ["sall"], axis=-1),
        N("Softmax", ["sall"], ["p"], axis=-1),
        N("Split", ["p", "cap_split"], ["pc", "pn"], axis=-1),
        N("MatMul", ["pc", "pv"], ["o1"]),
        N("Mul", ["pn", "vnew"], ["o2"]),
        N("Add", ["o1", "o2"], ["o"]),
        N("Reshape", ["o", "oshape"], ["out"]),
    ]
    kv = ["n", KV, CAP, HD]
    return model(nodes, [vi("qkv", 1, ["n", 1, (HEADS + 2 * KV) * HD]), vi("pk", 1, kv), vi("pv", 1, kv),
                         vi("pos2", 7, ["n", 1]), vi("mask", 1, ["n", 1, 1, CAP])],
                 [vi("out", 1, ["n", 1, HEADS * HD]), vi("knew", 1, ["n", KV, 1, HD]), vi("vnew", 1, ["n", KV, 1, HD])],
                 [numpy_helper.from_array(v, k) for k, v in c.items()])


def session(blob: bytes, threads: int) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.add_session_config_entry("session.intra_op.allow_spinning", "1")
    o.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(blob, o, providers=["CPUExecutionProvider"])


def bind(sess: ort.InferenceSession, inputs: dict, outputs: dict) -> object:
    b = sess.io_binding()
    for name, a in inputs.items():
        b.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
    for name, a in outputs.items():
        b.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
    return b


def case(n: int, threads: int, runs: int, rng: np.random.Generator) -> dict:
    pos = (CTX + rng.integers(-8, 9, n) if n > 1 else np.array([CTX])).astype(np.int64)
    qkv = rng.standard_normal((n, 1, (HEADS + 2 * KV) * HD), np.float32)
    k0 = rng.standard_normal((n, KV, CAP, HD), np.float32)
    v0 = rng.standard_normal((n, KV, CAP, HD), np.float32)
    # GQA: in place
    gk, gv = k0.copy(), v0.copy()
    gout = np.zeros((n, 1, HEADS * HD), np.float32)
    sk, tot, ql = pos.astype(np.int32), np.array(int(pos.max()) + 1, np.int32), np.ones(n, np.int32)
    gs = session(gqa_model(), threads)
    gb = bind(gs, {"qkv": qkv, "pk": gk, "pv": gv, "seqlens_k": sk, "total": tot, "qlens": ql},
              {"out": gout, "pk_out": gk, "pv_out": gv})
    # standard ops: self-contained (mask in-graph) and lean (per-layer part); new rows written from numpy
    pos2 = pos[:, None].copy()
    mask = np.where(np.arange(CAP)[None] < pos2, 0, -1e30).astype(np.float32)[:, None, None]
    rows = np.arange(n)
    variants = {}
    for name, blob, extra in (("std", std_model(), {"pos": pos}), ("lean", lean_model(), {"pos2": pos2, "mask": mask})):
        k, v, out = k0.copy(), v0.copy(), np.zeros_like(gout)
        kn, vn = np.zeros((n, KV, 1, HD), np.float32), np.zeros((n, KV, 1, HD), np.float32)
        sess = session(blob, threads)
        b = bind(sess, {"qkv": qkv, "pk": k, "pv": v, **extra}, {"out": out, "knew": kn, "vnew": vn})
        variants[name] = (sess, b, k, v, out, kn, vn)

    def write(k: np.ndarray, v: np.ndarray, kn: np.ndarray, vn: np.ndarray) -> None:
        k[rows, :, pos] = kn[:, :, 0]
        v[rows, :, pos] = vn[:, :, 0]

    gs.run_with_iobinding(gb)
    diff = {}
    for name, (sess, b, k, v, out, kn, vn) in variants.items():
        sess.run_with_iobinding(b)
        write(k, v, kn, vn)
        diff[name] = max(float(np.abs(gout - out).max()), float(np.abs(gk - k).max()), float(np.abs(gv - v).max()))
    times: dict[str, list[float]] = {"gqa": [], **{name: [] for name in variants}}
    for _ in range(runs):  # interleaved; a standard-op variant's time includes writing its new rows
        t0 = time.perf_counter()
        gs.run_with_iobinding(gb)
        times["gqa"].append(time.perf_counter() - t0)
        for name, (sess, b, k, v, _out, kn, vn) in variants.items():
            t0 = time.perf_counter()
            sess.run_with_iobinding(b)
            write(k, v, kn, vn)
            times[name].append(time.perf_counter() - t0)
    med = {name: 1e6 * float(np.median(t)) for name, t in times.items()}
    return {"n": n, "threads": threads, "diff": max(diff.values()), **med}


def main() -> None:
    global CAP, CTX
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--capacity", type=int, default=CAP)
    ap.add_argument("--context", type=int, default=CTX)
    a = ap.parse_args()
    CAP, CTX = a.capacity, a.context
    rng = np.random.default_rng(0)
    print(f"capacity {CAP}, context {CTX} (+-8 at batch 16), median of {a.runs} interleaved calls")
    heads = [f"{h:>8}" for h in ("GQA us", "std us", "lean us", "GQA/std", "GQA/lean", "maxdiff")]
    print(f"{'batch':>5} {'thr':>3} " + " ".join(heads))
    for threads in (1, 2):
        for n in (1, 16):
            r = case(n, threads, a.runs, rng)
            print(f"{n:>5} {threads:>3} {r['gqa']:8.1f} {r['std']:8.1f} {r['lean']:8.1f} {r['gqa'] / r['std']:8.2f} "
                  f"{r['gqa'] / r['lean']:8.2f} {r['diff']:8.1e}")


if __name__ == "__main__":
    main()

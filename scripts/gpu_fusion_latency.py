"""GPU check (issue 3): decode latency of one fused FFN vs the sequential FFNs it replaces.

Runs the reference runtime's own `Decoder` (bf16, random weights made on the device) for one
block run of the real Ultra width: hidden 16384, one FFN of width 343040 against 15 sequential
FFNs whose widths sum to 343040; batch 1 and 32, timed with CUDA events in one script.
On CPU (tiny sizes) it runs the same code path with wall-clock timing, to check the script itself:

    python scripts/gpu_fusion_latency.py --hidden 64 --total-width 3840 --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.mapping import Mapping
from export.rank_weights import find_ref
from export.runtime.model import load_decoder
from export.spec import FFN, Attention, AttentionKind, FFNKind, Layer, ModelSpec
from export.tensors import Role


class RandomWeights:
    """`RankWeights` that makes each tensor on the device (no checkpoint of 34 GB needed)."""

    def __init__(self, spec: ModelSpec, device: str, dtype: torch.dtype) -> None:
        self.spec, self.mapping, self.rank, self.device, self.dtype = spec, Mapping(), 0, device, dtype

    def get(self, role: Role, layer: int | None = None) -> torch.Tensor:
        shape = find_ref(self.spec, role, layer).shape
        if role in (Role.FFN_NORM, Role.ATTN_NORM, Role.FINAL_NORM):
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        return torch.randn(shape, device=self.device, dtype=self.dtype) * 0.01


def widths(total: int, parts: int) -> list[int]:
    units = total // 256
    return [256 * (units // parts + (1 if i < units % parts else 0)) for i in range(parts)]


def spec_for(hidden: int, ffn_widths: list[int]) -> ModelSpec:
    layers = tuple(Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.SWIGLU, w)) for w in ffn_widths)
    return ModelSpec(hidden=hidden, heads=1, head_dim=hidden, vocab=256, layers=layers)


def latency_ms(dec, batch: int, device: str, dtype: torch.dtype, iters: int) -> float:
    h = torch.randn(batch, 1, dec.spec.hidden, device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(3):
            dec.layers(h)
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                dec.layers(h)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            dec.layers(h)
        return (time.perf_counter() - t0) * 1e3 / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=16384)
    p.add_argument("--total-width", type=int, default=343040)
    p.add_argument("--parts", type=int, default=15)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, ws in (("sequential", widths(args.total_width, args.parts)), ("fused", [args.total_width])):
        dec = load_decoder(RandomWeights(spec_for(args.hidden, ws), args.device, dtype), dtype=dtype,
                           device=args.device)
        for b in (int(x) for x in args.batches.split(",")):
            rows.append({"variant": name, "ffns": len(ws), "batch": b,
                         "ms": latency_ms(dec, b, args.device, dtype, args.iters)})
        del dec
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    for b in sorted({r["batch"] for r in rows}):
        seq, fused = (next(r["ms"] for r in rows if r["batch"] == b and r["variant"] == v)
                      for v in ("sequential", "fused"))
        print(f"batch {b:3d}: sequential {seq:8.3f} ms  fused {fused:8.3f} ms  speedup {seq / fused:.2f}x")
    print(json.dumps({"hidden": args.hidden, "total_width": args.total_width, "dtype": args.dtype,
                      "device": args.device, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

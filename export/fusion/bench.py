"""Benchmarks for the fusion tools, each against a baseline measured in the same run.

    python -m export.fusion.bench [--layers 16] [--hidden 256] [--tokens 512]

1. analyze: M with stored per-block states vs the literal definition (rerun the whole model from
   the embedding for every removed block): block calls and wall time.
2. fuse: streamed fusion vs a plain streamed copy of the same checkpoint (same reader and writer):
   MB/s, so the ratio shows what stacking, folding and concatenating cost on top of the I/O.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from export.fusion.analyze import dependency_matrix
from export.fusion.calib import load_model
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import FusionPlan, PlanOptions, propose_plan
from export.spec import FFN, Attention, AttentionKind, FFNKind, Layer, ModelSpec
from export.synthetic import write_random_checkpoint


def bench_spec(layers: int, hidden: int) -> ModelSpec:
    """Attention blocks around a middle run of attention-free FFNs (half the layers)."""
    full = Layer(Attention(AttentionKind.FULL, 2), FFN(FFNKind.SWIGLU, 4 * hidden))
    ffn = Layer(Attention(AttentionKind.NOOP), FFN(FFNKind.SWIGLU, 4 * hidden))
    a = layers // 4
    return ModelSpec(hidden=hidden, heads=8, head_dim=hidden // 8, vocab=1024,
                     layers=(full,) * a + (ffn,) * (layers - 2 * a) + (full,) * a, dtype="float32")


def naive_calls(dec, ids) -> int:
    """The definition run literally: for each removed block, the whole model again."""
    m = dec.spec.num_layers
    with torch.inference_mode():
        for skip in range(m):
            h = dec.embed(ids)
            for j in range(m):
                if j != skip:
                    h = dec.block(j, h)
    return m * (m - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.fusion.bench", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_random_checkpoint(Path(tmp) / "m", bench_spec(args.layers, args.hidden), std=0.05)
        spec, dec = load_model(src)
        ids = torch.randint(0, spec.vocab, (args.tokens // 128, 128))
        with torch.inference_mode():
            dec(ids)  # warm-up: first-call allocations are not the algorithm's cost
        t = time.perf_counter()
        dep = dependency_matrix(dec, ids, batch=8, progress=False)
        fast = time.perf_counter() - t
        t = time.perf_counter()
        slow_calls = naive_calls(dec, ids)
        slow = time.perf_counter() - t
        print(f"analyze  {args.layers} layers, {ids.numel()} tokens: {dep.block_calls} block calls in {fast:.2f} s "
              f"vs literal definition {slow_calls} calls in {slow:.2f} s -> {slow / fast:.2f}x faster")
        plan = propose_plan(spec, PlanOptions(exclude_last=False))
        size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
        t = time.perf_counter()
        fuse_checkpoint(src, FusionPlan([]), Path(tmp) / "copy", progress=False)
        copy = time.perf_counter() - t
        t = time.perf_counter()
        fuse_checkpoint(src, plan, Path(tmp) / "fused", norm="fold", progress=False)
        fused = time.perf_counter() - t
        print(f"fuse     {size:.0f} MiB, group {plan.groups}: {size / fused:.0f} MiB/s vs plain streamed copy "
              f"{size / copy:.0f} MiB/s -> {copy / fused:.2f}x of copy speed")
        shutil.rmtree(Path(tmp) / "fused", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

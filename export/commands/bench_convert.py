"""`bench convert`: registered in the `bench` command group (export/commands/bench.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.commands.bench import bench
from export.commands.registry import comma_ints, default_path, print_report


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=default_path("out", "bench"),
                   help="where the synthetic Llama-3.1-8B-shaped checkpoints are generated once (default: out/bench)")
    p.add_argument("--layers", type=comma_ints("--layers"), default=(16, 32),
                   help="model sizes in decoder layers of the real 8B shapes (default 16,32: half and the whole "
                        "model, 7.9 and 16.1 GB; about 45 GB of free disk for cache and outputs)")
    p.add_argument("--tp", type=int, default=4, help="tensor-parallel size to convert for")
    p.add_argument("--repeats", type=int, default=2, help="copy/convert runs alternated per size; the best of each")
    p.add_argument("--fp8", action="store_true",
                   help="the same shapes as an FP8 (ModelOpt) checkpoint: FP8 linears with their scales, FP8 KV cache")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")


@bench("convert", "convert --tp 4 GB/s (embedding whole, and --parallel-embedding) vs a plain copy of the same "
                  "files, and peak RSS at two model sizes", _args)
def _bench_convert(args: argparse.Namespace) -> int:
    from export.trtllm.bench import bench_convert, format_report

    rep = bench_convert(args.cache, sizes=args.layers, tp=args.tp, repeats=args.repeats, fp8=args.fp8)
    return print_report(format_report(rep), rep, args.json_out)

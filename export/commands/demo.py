"""`demo`: the embedded default -- the whole pipeline on the shipped Puzzle-style demo model."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.commands.registry import command, default_path, with_args


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", type=Path, default=None, help="HF checkpoint to run (default: the shipped demo model)")
    p.add_argument("--work", type=Path, default=default_path("out", "demo"),
                   help="analysis, fused checkpoint and Triton repository go here")
    p.add_argument("--engine-dir", type=Path, default=default_path("engines", "demo"),
                   help="where the demo's engine directory is written")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the exported engine")
    p.add_argument("--backend", choices=("onnx", "cpu"), default="onnx",
                   help="what Triton serves: onnx (ONNX Runtime, tp=1, the faster here) or cpu "
                        "(PyTorch runtime over --tp worker processes)")
    p.add_argument("--prompt", default="def ", help="the prompt sent to the served model")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per query")
    p.add_argument("--progress", action="store_true", help="show per-step progress bars")


@command("demo", "run it all on the shipped demo model: analyze, fuse, convert, verify, build, package, serve, query")
@with_args(_args)
def _cmd_demo(args: argparse.Namespace) -> int:
    from export.demo.run import DemoConfig, main_demo

    cfg = DemoConfig(work=args.work, engine_dir=args.engine_dir, tp=args.tp, backend=args.backend, prompt=args.prompt,
                     max_tokens=args.max_tokens, progress=args.progress)
    if args.source is not None:
        cfg.source = args.source
    return main_demo(cfg)

"""`demo`: the embedded default -- the whole pipeline on the shipped Puzzle-style demo model."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.commands.registry import command, default_path, with_args


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", type=Path, default=None, help="HF checkpoint to run (default: the shipped demo model)")
    p.add_argument("--work", type=Path, default=None,
                   help="analysis, fused checkpoint and Triton repository go here (default: out/demo, "
                        "out/demo-fp8 with --fp8)")
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="where the demo's engine directory is written (default: engines/demo, engines/demo-fp8)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the exported engine")
    p.add_argument("--backend", choices=("onnx", "cpu"), default=None,
                   help="what Triton serves: onnx (ONNX Runtime, tp=1, the faster here; the default) or cpu "
                        "(PyTorch runtime over --tp worker processes; the default with --fp8, which only it runs)")
    p.add_argument("--fp8", action="store_true",
                   help="quantize to FP8 first (calibrated weights, activations, KV cache), then fuse, convert to "
                        "a TensorRT-LLM FP8 checkpoint, verify and serve it (docs/fp8.md)")
    p.add_argument("--prompt", default="def ", help="the prompt sent to the served model")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per query")
    p.add_argument("--progress", action="store_true", help="show per-step progress bars")


@command("demo", "run it all on the shipped demo model: analyze, fuse, convert, verify, build, package, serve, query")
@with_args(_args)
def _cmd_demo(args: argparse.Namespace) -> int:
    from export.demo.run import DemoConfig, main_demo
    from export.errors import ExportError

    suffix = "-fp8" if args.fp8 else ""
    backend = args.backend or ("cpu" if args.fp8 else "onnx")
    if args.fp8 and backend == "onnx":
        raise ExportError("demo --fp8 --backend onnx: the ONNX runtime has no FP8 (it is emulated in the PyTorch "
                          "runtime only); use --backend cpu")
    cfg = DemoConfig(work=args.work or default_path("out", "demo" + suffix),
                     engine_dir=args.engine_dir or default_path("engines", "demo" + suffix), tp=args.tp,
                     backend=backend, prompt=args.prompt, max_tokens=args.max_tokens, progress=args.progress,
                     fp8=args.fp8)
    if args.source is not None:
        cfg.source = args.source
    return main_demo(cfg)

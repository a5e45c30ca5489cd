"""`bench <name>`: a group of benchmark commands; each stage registers its own sub-benchmark.

Another module adds one with::

    from export.commands.bench import bench
    @bench("convert", "one-line help", configure=lambda p: p.add_argument(...))
    def _bench_convert(args) -> int: ...

All command modules are imported before the parser is built, so the registry is complete then.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from export.commands.registry import command, print_report, with_args
from export.errors import ExportError
from export.runtime import registry

Configure = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], int]
BENCHES: dict[str, tuple[str, Configure, Handler]] = {}


def bench(name: str, help_text: str, configure: Configure = lambda p: None) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        BENCHES[name] = (help_text, configure, fn)
        return fn
    return deco


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (help_text, configure, _) in sorted(BENCHES.items()):
        configure(sub.add_parser(name, help=help_text, description=help_text, formatter_class=p.formatter_class))


@command("bench", "benchmarks that print figures (ratios against a baseline measured in the same run)")
@with_args(_configure)
def _cmd_bench(args: argparse.Namespace) -> int:
    return BENCHES[args.bench][2](args)


# ---- bench decode (the reference runtime) ----------------------------------------------------
def _tps(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tp wants a comma-separated list of integers, got {text!r}") from None


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", type=Path, help="HF checkpoint dir (or TRT-LLM checkpoint / engines/NAME)")
    p.add_argument("--tp", type=_tps, default=[1, 2], help="comma-separated tp sizes; the first is the baseline")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    p.add_argument("--batches", type=_tps, default=[1, 8], help="decode batch sizes")
    p.add_argument("--dtype", default="float32", help="compute dtype: fp32 | bf16 | fp16")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--runtime", type=_runtimes, default=("torch",),
                   help=f"comma-separated runtimes -- {registry.describe()}")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats (engines alternate each repeat); figures are medians")
    p.add_argument("--against-llama-cpp", type=Path, default=None, metavar="LLAMA_BENCH",
                   help="a llama-bench binary: run `llama-bench -m GGUF -p 0 -n 64 -t THREADS -o json` in each "
                        "repeat and print our batch-1 decode as a ratio of its (needs --gguf)")
    p.add_argument("--gguf", type=Path, default=None, help="the model as GGUF, for --against-llama-cpp")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")


def _runtimes(text: str) -> tuple[str, ...]:
    names = tuple(x for x in text.split(",") if x)
    bad = [n for n in names if n not in registry.names()]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--runtime wants a comma-separated list of {registry.names()}, "
                                         f"got {text!r}")
    return names


@bench("decode", "prefill/decode tokens/s and sync points per token, per runtime (torch, onnx) and tp", _decode_args)
def _bench_decode(args: argparse.Namespace) -> int:
    from export.io.output import check_output_file
    from export.runtime.bench import bench_decode, format_table

    if (args.against_llama_cpp is None) != (args.gguf is None):
        raise ExportError("--against-llama-cpp and --gguf go together (a llama-bench binary and the model as GGUF)")
    if args.repeats < 1:
        raise ExportError(f"--repeats must be >= 1, got {args.repeats}")
    llama = (args.against_llama_cpp, args.gguf) if args.gguf else None
    if args.json_out:  # a report, rewritten freely; but never over the checkpoint
        check_output_file(args.json_out, inputs=[args.ckpt], overwrite=True)
    report = bench_decode(args.ckpt, args.tp, pp=args.pp, prompt_len=args.prompt_len, batches=tuple(args.batches),
                          steps=args.steps, dtype=args.dtype, threads=args.threads, runtimes=args.runtime,
                          repeats=args.repeats, llama_cpp=llama)
    return print_report(format_table(report), report, args.json_out)

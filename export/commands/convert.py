"""`convert`, `verify`, `build`: HF checkpoint -> TRT-LLM checkpoint -> checked -> TensorRT engines."""

from __future__ import annotations

import argparse
import json

from export.commands.registry import command, with_args
from export.io.paths import FOLLOW_SYMLINKS_HELP


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="HF checkpoint directory (DeciLM / nemotron-nas or plain Llama)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel size (TRT-LLM's uneven split; each stage needs a full-attention layer)")
    p.add_argument("--dtype", default=None,
                   help="bf16 | fp16 | fp32 (default: the source's; an FP8 source keeps its FP8 linears, and a bf16 "
                        "one is quantized by `python -m export quantize`, not here)")
    p.add_argument("--out", help="output engine directory, e.g. engines/NAME (new, or ours with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous output of this toolkit (anything else is refused)")
    p.add_argument("--parallel-embedding", action="store_true",
                   help="split the embedding across tp ranks (TRT-LLM use_parallel_embedding) instead of a whole "
                        "copy per rank: saves (tp-1)/tp of it per rank, costs one collective per forward pass")
    p.add_argument("--embedding-sharding-dim", type=int, choices=(0, 1), default=0,
                   help="with --parallel-embedding: 0 splits vocab rows (all-reduce), 1 hidden columns (all-gather)")
    p.add_argument("--dry-run", nargs="?", const="", metavar="CONFIG", default=None,
                   help="print per-rank tensor names, shapes and bytes from config.json alone; write nothing")
    p.add_argument("--summary", action="store_true", help="with --dry-run: per-rank totals only")
    p.add_argument("--json", action="store_true", help="print the result (with --dry-run: the plan) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--follow-symlinks", action="store_true", help=FOLLOW_SYMLINKS_HELP)


@command("convert", "HF checkpoint -> TRT-LLM checkpoint (config.json + rank{r}.safetensors) in one streaming pass")
@with_args(_convert_args)
def _cmd_convert(args: argparse.Namespace) -> int:
    from export.errors import ExportError
    from export.mapping import Mapping

    embedding = args.embedding_sharding_dim if args.parallel_embedding else None
    if args.dry_run is not None:
        from export.sources import load_spec
        from export.trtllm.dryrun import dry_run, format_dry_run

        config = args.dry_run or args.source
        if not config:
            raise ExportError("--dry-run needs a config.json (or a checkpoint directory)")
        rep = dry_run(load_spec(config), Mapping(args.tp, args.pp, embedding_shard=embedding), args.dtype)
        print(json.dumps(rep, indent=1) if args.json else format_dry_run(rep, tensors=not args.summary))
        return 0 if not rep["problems"] else 1
    if not args.source or not args.out:
        raise ExportError("convert needs a source checkpoint and --out engines/NAME (or --dry-run CONFIG)")
    from export.engine_dir import hf_checkpoint
    from export.io.output import check_output

    args.source = hf_checkpoint(args.source)
    check_output(args.out, inputs=[args.source], overwrite=args.overwrite)  # refuse before torch is even imported
    from export.trtllm.convert import convert

    res = convert(args.source, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, progress=not args.no_progress,
                  overwrite=args.overwrite, follow_symlinks=args.follow_symlinks, embedding_shard=embedding)
    m = res.manifest
    if args.json:
        print(json.dumps({"out": str(res.out), "tp": m.tp, "pp": m.pp, "dtype": m.dtype, "tokenizer": m.tokenizer,
                          **({"fp8": m.engines["cpu"]["fp8"]} if "fp8" in m.engines.get("cpu", {}) else {}),
                          "bytes_read": res.bytes_read, "bytes_written": res.bytes_written,
                          "seconds": round(res.seconds, 3)}, indent=2))
        return 0
    print(f"wrote {res.out}: checkpoint/ ({m.tp * m.pp} rank files, tp={m.tp} pp={m.pp}, {m.dtype}), "
          f"tokenizer/ {'copied' if m.tokenizer else 'absent (source has none)'}, manifest.json")
    print(f"read {res.bytes_read / 1e9:.3f} GB, wrote {res.bytes_written / 1e9:.3f} GB in {res.seconds:.2f} s "
          f"({res.bytes_read / 1e6 / res.seconds:.0f} MB/s read)")
    fp8 = m.engines.get("cpu", {}).get("fp8")
    if fp8:
        print(f"FP8 ({fp8['quantization']}): " + (
            "q/k/v scales equal in every layer, no requantization" if not fp8["requantized_layers"] else
            f"q/k/v requantized to their max scale in layers {fp8['requantized_layers']}, largest change of a "
            f"weight {fp8['max_relative_error']:.3g} of its layer's max |w| (recorded in manifest.json)"))
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine_dir", help="engines/NAME written by convert")
    p.add_argument("--against", default=None,
                   help="the source HF checkpoint, run at tp=1 as the reference (default: the manifest's source_path)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="max abs logits difference when every source value is exact in the checkpoint dtype")
    p.add_argument("--bf16-reference", default=None, metavar="CKPT",
                   help="FP8 sources: the unquantized model it was quantized from; adds perplexity, KL and top-1 "
                        "agreement of the FP8 rank files against it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--follow-symlinks", action="store_true", help=FOLLOW_SYMLINKS_HELP)


@command("verify", "run the reference runtime on the rank files (at their tp/pp); compare logits with the source")
@with_args(_verify_args)
def _cmd_verify(args: argparse.Namespace) -> int:
    from export.checks.verify import verify
    from export.engine_dir import EngineDir
    from export.io.paths import set_default_follow_symlinks

    set_default_follow_symlinks(args.follow_symlinks)  # the reference runs in worker processes
    against = args.against or EngineDir(args.engine_dir).manifest.source_path
    res = verify(args.engine_dir, against, tol=args.tol, bf16_reference=args.bf16_reference)
    print(json.dumps(res.to_json(), indent=2) if args.json else res.summary())
    return 0 if res.passed else 1


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine_dir", help="engines/NAME written by convert")
    p.add_argument("--onnx", action="store_true",
                   help="write engines/NAME/onnx (ONNX decoder graph, fp32, tp=1) instead of running trtllm-build")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--onnx)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing engines/NAME/onnx or engines/NAME/trtllm written by this toolkit")
    p.add_argument("--require-trtllm", action="store_true",
                   help="exit non-zero when TensorRT-LLM or a GPU is missing (default: explain and exit 0)")
    for key in ("max-batch-size", "max-input-len", "max-seq-len", "max-num-tokens"):
        p.add_argument(f"--{key}", type=int, default=None, help="default: the manifest's build settings")


@command("build", "trtllm-build the checkpoint into engines/NAME/trtllm (GPU hosts with tensorrt-llm 1.2.1), "
                  "or --onnx: an ONNX graph into engines/NAME/onnx")
@with_args(_build_args)
def _cmd_build(args: argparse.Namespace) -> int:
    if args.onnx:
        from export.onnx.export import build_onnx, gpu_hint

        print(build_onnx(args.engine_dir, progress=not args.no_progress, overwrite=args.overwrite).summary())
        print(gpu_hint(args.engine_dir))
        return 0
    from export.trtllm.build import BUILD_KEYS, build

    outcome = build(args.engine_dir, options={k: getattr(args, k) for k in BUILD_KEYS}, require=args.require_trtllm,
                    overwrite=args.overwrite)
    print(outcome.message)
    return 0

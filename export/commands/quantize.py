"""`quantize`: post-training per-tensor FP8 of an HF checkpoint (thin wrapper over `export.quantize`)."""

from __future__ import annotations

import argparse

from export.commands.registry import checkpoint_writer_args, command, with_args


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="HF checkpoint directory in bf16, fp16 or fp32 (safetensors + config.json)")
    p.add_argument("--out", required=True, help="output directory (written atomically; new, or ours with --overwrite)")
    p.add_argument("--calib", required=True, help="calibration text: a file, or a directory of .txt/.md/.py files")
    p.add_argument("--heldout", default=None,
                   help="held-out text (not the calibration text) for the quality report: perplexity of both, "
                        "KL(source || FP8), top-1 agreement (default: no report)")
    p.add_argument("--kv-cache", default=None, metavar="fp8",
                   help="fp8: an FP8 KV cache, with k/v scales calibrated from k (after RoPE) and v "
                        "(default: the KV cache stays in the model dtype)")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN",
                   help="HF module names (fnmatch wildcards, a prefix excludes what is under it) to leave "
                        "unquantized, written to exclude_modules (default: lm_head)")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens to use")
    p.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens to score on")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the checkpoint's)")
    checkpoint_writer_args(p)


@command("quantize", "post-training FP8 (per-tensor, calibrated on the CPU) -> a ModelOpt-format HF FP8 checkpoint")
@with_args(_quantize_args)
def _cmd_quantize(args: argparse.Namespace) -> int:
    from export.engine_dir import hf_checkpoint
    from export.io.output import check_output

    args.ckpt = hf_checkpoint(args.ckpt)
    inputs = [args.ckpt, args.calib, args.heldout, args.tokenizer]
    check_output(args.out, inputs=inputs, overwrite=args.overwrite)  # before torch is imported
    from export.fusion.evaluate import format_scores
    from export.io.paths import set_default_follow_symlinks
    from export.quantize.checkpoint import DEFAULT_EXCLUDE, REPORT, quantize_checkpoint

    set_default_follow_symlinks(args.follow_symlinks)
    r = quantize_checkpoint(args.ckpt, args.out, args.calib, kv_cache=args.kv_cache,
                            exclude=tuple(args.exclude) if args.exclude is not None else DEFAULT_EXCLUDE,
                            heldout=args.heldout, calib_tokens=args.tokens, heldout_tokens=args.heldout_tokens,
                            seq_len=args.seq_len, batch=args.batch, tokenizer=args.tokenizer,
                            overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                            follow_symlinks=args.follow_symlinks)
    rep = r.report
    q = rep["quantization"]
    print(f"calibrated on {rep['calibration']['tokens']} tokens in {rep['seconds']['calibrate']:.1f} s: "
          f"{rep['fp8_linears']} FP8 linears, KV cache {q['kv_cache_quant_algo'] or r.spec.dtype}, "
          f"excluded: {', '.join(q['exclude_modules']) or 'none'}")
    print("q/k/v and gate/up of each layer share one weight scale and one input scale (fused deployment)")
    if r.scores is None:
        print("no --heldout text: quality report skipped")
    else:
        print(format_scores(r.scores))
    b = rep["bytes"]
    print(f"wrote {r.out} ({b['fp8'] / 2**20:.1f} MiB, {b['ratio']:.2f} x the source's "
          f"{b['source'] / 2**20:.1f} MiB, in {rep['seconds']['total']:.1f} s); report in {REPORT}")
    return 0

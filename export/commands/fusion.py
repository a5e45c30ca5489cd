"""FFN Fusion subcommands: plan, fuse, analyze, evaluate (thin wrappers over `export.fusion`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from export.commands.registry import checkpoint_writer_args, command, with_args
from export.errors import ExportError
from export.io.paths import FOLLOW_SYMLINKS_HELP

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def byte_size(text: str) -> int:
    """'80GiB', '512MB', '1e9' -> bytes (argparse type)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 80GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _plan_option_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("automatic plan")
    g.add_argument("--include-last", action="store_true",
                   help="also fuse the last FFN of each attention-free run (the paper leaves it unfused)")
    g.add_argument("--max-width", type=int, default=None, help="widest fused FFN allowed (intermediate size)")
    g.add_argument("--budget", type=byte_size, default=None,
                   help="per-rank bytes one fused FFN may take at --tp (e.g. 20GiB); runs are split to fit")
    g.add_argument("--tp", type=int, default=1, help="target tensor-parallel size for --budget")
    g.add_argument("--dtype", default=None, help="dtype for --budget (default: the checkpoint's)")
    g.add_argument("--threshold", type=float, default=None,
                   help="largest dependency M[i][j] allowed inside a group (needs a dependency matrix)")


def _plan_options(args: argparse.Namespace):
    from export.fusion.plan import PlanOptions

    return PlanOptions(exclude_last=not args.include_last, max_width=args.max_width, budget_bytes=args.budget,
                       tp=args.tp, dtype=args.dtype, threshold=args.threshold)


# ---- plan ----------------------------------------------------------------------------------
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint directory (or config.json)")
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--matrix", default=None, help="dependency.json from `analyze` (for --threshold)")
    _plan_option_args(p)


@command("plan", "propose an FFN-fusion plan (editable JSON) from the config, optionally thresholded on M")
@with_args(_plan_args)
def _cmd_plan(args: argparse.Namespace) -> int:
    from export.io.output import check_output_file

    check_output_file(args.out, inputs=[args.ckpt, args.matrix], overwrite=args.overwrite)  # before the imports
    from export.fusion.plan import propose_plan
    from export.sources import load_spec

    spec = load_spec(args.ckpt)
    matrix = _load_matrix(args.matrix) if args.matrix else None
    plan = propose_plan(spec, _plan_options(args), matrix)
    plan.save(args.out)
    _print_plan(plan)
    print(f"wrote {args.out}")
    return 0


def _load_matrix(path: str) -> list[list[float | None]]:
    try:
        return json.loads(Path(path).read_text())["matrix"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not a dependency matrix from `analyze` ({e})") from None


def _print_plan(plan) -> None:
    if not plan.derived:
        print("no groups: nothing to fuse")
    for d in plan.derived:
        dep = f", max M {d['max_dependency']:.4f}" if "max_dependency" in d else ""
        print(f"group [{d['group'][0]}, {d['group'][1]}]: {len(d['ffn_layers'])} FFNs {d['widths']} "
              f"-> width {d['fused_width']}{dep}")


# ---- fuse ----------------------------------------------------------------------------------
def _fuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="HF checkpoint directory (safetensors + config.json)")
    p.add_argument("--plan", required=True, help="plan JSON (from `plan` or `analyze`, edited or not)")
    p.add_argument("--out", required=True, help="output directory (written atomically; new, or ours with --overwrite)")
    p.add_argument("--norm", choices=["fold", "last"], default="fold",
                   help="fold: each layer's norm scale into its gate/up: the parallel form, with each folded "
                        "weight rounded once to the output dtype (default); last: the last layer's norm for "
                        "all (the paper)")
    p.add_argument("--dtype", default=None,
                   help="output dtype, bf16 | fp16 | fp32 (default: the source's); fp32 keeps folded norms "
                        "unrounded")
    p.add_argument("--keep-layer-count", action="store_true",
                   help="keep fused-away blocks as empty blocks (as the released Ultra config does)")
    p.add_argument("--as", dest="form", choices=["wide-ffn", "parallel-blocks"], default="wide-ffn",
                   help="wide-ffn: each group one wide FFN (Theorem 3.1); parallel-blocks: each group one "
                        "Puzzletron parallel_blocks layer of the members' own FFNs, exact (Puzzletron sources "
                        "only; --norm does not apply); see docs/fusion.md")
    p.add_argument("--fp8-requant", choices=["refit", "max-scale"], default="refit",
                   help="FP8 sources: refit: dequantize, fuse, requantize each fused tensor once at its amax/448 "
                        "(default); max-scale: each member requantized to the group's largest weight scale "
                        "(TRT-LLM's q/k/v rule); see docs/fp8.md")
    p.add_argument("--calib", default=None,
                   help="FP8 sources: calibration text (file or directory); the fused gate/up input scales are "
                        "then measured on it (default: a bound derived from the members' scales)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="tokens of --calib to use (default 2048)")
    checkpoint_writer_args(p)


@command("fuse", "fuse FFN groups of an HF DeciLM checkpoint into wide FFNs (Ultra-style checkpoint)")
@with_args(_fuse_args)
def _cmd_fuse(args: argparse.Namespace) -> int:
    from export.engine_dir import hf_checkpoint
    from export.io.output import check_output

    args.ckpt = hf_checkpoint(args.ckpt)
    inputs = [args.plan, *([args.calib] if args.calib else [])]
    check_output(args.out, inputs=[args.ckpt, *inputs], overwrite=args.overwrite)  # before torch is imported
    from export.fusion.fuse import fuse_checkpoint
    from export.fusion.plan import FusionPlan

    plan = FusionPlan.load(args.plan)
    amax = _fused_input_amax(args, plan) if args.calib else None
    r = fuse_checkpoint(args.ckpt, plan, args.out, norm=args.norm,
                        keep_layer_count=args.keep_layer_count, max_shard_bytes=args.max_shard_size,
                        dtype=args.dtype, overwrite=args.overwrite, inputs=inputs,
                        follow_symlinks=args.follow_symlinks, form=args.form, requant=args.fp8_requant,
                        input_amax=amax)
    for g in r.groups:
        into = (f"one FFN of width {g.fused_width}" if args.form == "wide-ffn"
                else f"one parallel-blocks layer of {len(g.ffn_layers)} branches")
        print(f"group {g.label}: {len(g.ffn_layers)} FFNs {list(g.widths)} -> {into}")
    print(f"layers {r.before.num_layers} -> {r.after.num_layers}, FFN blocks {len(r.before.ffn_layers())} -> "
          f"{len(r.after.ffn_layers())}, sync points per token {r.before.sync_points_per_token()} -> "
          f"{r.after.sync_points_per_token()}")
    how = f"norm={args.norm}" if args.form == "wide-ffn" else "as parallel-blocks, norms per branch"
    if r.fp8:
        from export.fusion.fp8_fuse import summary

        rule = "calibrated on --calib" if amax else "derived (never saturating on the calibration data)"
        print(f"fp8 ({args.fp8_requant}): {summary(r.fp8)}; gate/up input scales {rule}, down: max of the members'")
    print(f"wrote {r.out} ({r.bytes_written / 2**20:.1f} MiB in {r.seconds:.2f} s, {how})")
    odd = [i for i, lay in enumerate(r.after.layers) if lay.ffn.width is not None and lay.ffn.ffn_mult is None]
    if odd and r.after.block_schema.width_key == "ffn_mult":  # TRT-LLM's PyTorch nemotron_nas: ffn_mult only
        print(f"note: no ffn_mult gives the FFN width of layer(s) {odd}, so config.json says intermediate_size "
              f"there: vLLM, this toolkit and the TRT-LLM engine path (`convert`) read it; TensorRT-LLM's PyTorch "
              f"backend reads ffn_mult only", file=sys.stderr)
    return 0


def _fused_input_amax(args: argparse.Namespace, plan) -> dict[int, float] | None:
    """`--calib` on an FP8 source: each group's fused gate/up input amax, measured (fusion.calib)."""
    from export.fusion.calib import fused_input_amax
    from export.spec import ModelSpec

    spec = ModelSpec.load(args.ckpt)
    if not spec.quant.fp8:
        raise ExportError(f"{args.ckpt}: --calib measures FP8 input scales; this checkpoint is not FP8")
    return fused_input_amax(args.ckpt, plan.resolve(spec), args.calib, fold=args.norm == "fold",
                            tokens=args.calib_tokens)


# ---- analyze -------------------------------------------------------------------------------
def _text_args(p: argparse.ArgumentParser, tokens: int) -> None:
    p.add_argument("--tokens", type=int, default=tokens, help=f"tokens to use (default {tokens})")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the checkpoint's)")
    p.add_argument("--follow-symlinks", action="store_true", help=FOLLOW_SYMLINKS_HELP)


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--calib", required=True, help="calibration text: a file, or a directory of .txt/.md/.py files")
    p.add_argument("--out", default=None, help="output directory (default out/analysis/<ckpt name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous output of this toolkit (anything else is refused)")
    _text_args(p, 2048)
    _plan_option_args(p)


@command("analyze", "block-dependency matrix M on calibration text, a proposed fusion plan and a heatmap")
@with_args(_analyze_args)
def _cmd_analyze(args: argparse.Namespace) -> int:
    from export.io.output import check_output
    from export.io.paths import set_default_follow_symlinks

    set_default_follow_symlinks(args.follow_symlinks)
    out = Path(args.out or Path("out", "analysis", Path(args.ckpt).resolve().name))
    check_output(out, inputs=[args.ckpt, args.calib, args.tokenizer], overwrite=args.overwrite)
    from export.fusion.analyze import analyze_checkpoint

    a = analyze_checkpoint(args.ckpt, args.calib, out, tokens=args.tokens, seq_len=args.seq_len,
                           batch=args.batch, options=_plan_options(args), tokenizer=args.tokenizer,
                           overwrite=args.overwrite)
    d = a.dependency
    print(f"M over {d.tokens} tokens: {d.block_calls} block calls in {d.seconds:.1f} s")
    _print_plan(a.plan)
    print(f"wrote {out}/dependency.json, plan.json, heatmap.png")
    return 0


# ---- evaluate ------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the reference checkpoint")
    p.add_argument("candidates", nargs="+", help="checkpoint(s) to compare against BASE")
    p.add_argument("--text", required=True, help="held-out text: a file, or a directory of .txt/.md/.py files")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    _text_args(p, 4096)


@command("evaluate", "held-out perplexity, KL and top-1 agreement vs BASE, layer count, sync points per token")
@with_args(_evaluate_args)
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from export.io.output import check_output_file

    if args.json:  # a report, rewritten freely; but never over an input, and checked before the long pass
        check_output_file(args.json, inputs=[args.base, *args.candidates, args.text, args.tokenizer], overwrite=True)
    from export.fusion.evaluate import evaluate, format_scores
    from export.io.atomic import atomic_write_text
    from export.io.paths import set_default_follow_symlinks

    set_default_follow_symlinks(args.follow_symlinks)
    scores = evaluate(args.base, args.candidates, args.text, tokens=args.tokens, seq_len=args.seq_len,
                      batch=args.batch, tokenizer=args.tokenizer)
    print(format_scores(scores))
    if args.json:
        atomic_write_text(args.json, json.dumps([s.to_json() for s in scores], indent=2) + "\n")
    return 0

"""`inspect`: plan a deployment from config files alone (no torch, no weights read)."""

from __future__ import annotations

import argparse
import json

from export.commands.registry import command, with_args


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="config.json, a checkpoint directory holding one, or an engines/NAME directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to plan for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to plan for")
    p.add_argument("--dtype", default=None,
                   help="fp8 (the linears in FP8 E4M3 + per-tensor scales as ModelOpt's recipe quantizes them, "
                        "lm_head excluded; the rest in the config's dtype) | bf16 | fp16 | fp32 (every tensor, "
                        "unquantized) (default: the config's, FP8 when its quantization_config says so)")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="fp8 (1 byte a value, TRT-LLM's kv_cache_quant_algo FP8) or the weights' dtype "
                        "(default: the config's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--target", choices=("trtllm", "cpu"), default="trtllm",
                   help="what the exit status judges the layout for: trtllm (convert, trtllm-build; the default) "
                        "or cpu (the reference engine: verify, generate), which runs stages trtllm-build cannot")


@command("inspect", "plan a deployment from config.json: layers, parameters, KV cache, per-rank and "
                    "per-stage bytes")
@with_args(_inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    from export.deployment_plan import format_report, plan_report, planned
    from export.mapping import Mapping
    from export.sources import load_spec

    spec = planned(load_spec(args.path), args.dtype, args.kv_cache_dtype)
    rep = plan_report(spec, Mapping(args.tp, args.pp))
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0 if rep["targets"][args.target]["ok"] else 2

"""`plan-deployment`: which layouts fit N GPUs of a kind, ranked, with the commands for the chosen one."""

from __future__ import annotations

import argparse
import json

from export.commands.registry import command, with_args


def _args(p: argparse.ArgumentParser) -> None:
    from export.deploy import DEFAULT_KV_FRACTION, DEFAULT_RESERVE, GPUS, GiB

    p.add_argument("config", help="config.json, a checkpoint directory holding one, or an engines/NAME directory")
    p.add_argument("--gpu", required=True, metavar="KIND|MEM",
                   help=f"{' | '.join(GPUS)}, or a memory size per GPU such as 80GB or 79.6GiB")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (tp stays inside one; pp may span them)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence, prompt + output (default: convert's max_seq_len for this model)")
    p.add_argument("--batch", type=int, default=None,
                   help="concurrent sequences wanted (default: convert's max_batch_size)")
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE / GiB,
                   help="per GPU, for CUDA context, NCCL/cuBLAS workspaces and activations")
    p.add_argument("--kv-fraction", type=float, default=DEFAULT_KV_FRACTION,
                   help="share of the rest given to the KV cache (TRT-LLM's kv_cache_free_gpu_mem_fraction)")
    p.add_argument("--no-fp8", action="store_true", help="bf16 weights and KV cache only")
    p.add_argument("--top", type=int, default=12, help="rows of the table to print")
    p.add_argument("--source", default="SRC", help="source checkpoint path to put in the printed commands")
    p.add_argument("--json", action="store_true", help="print the whole plan (every layout) as JSON")


@command("plan-deployment", "which layouts (tp x pp, bf16/fp8 weights and KV cache, parallel embedding) fit "
                            "N GPUs, ranked, with per-GPU weights, KV-cache tokens, sequences and the commands")
@with_args(_args)
def _cmd_plan(args: argparse.Namespace) -> int:
    from export.deploy import GiB, format_plan, parse_gpu, plan_deployment
    from export.manifest import DEFAULT_BUILD
    from export.sources import load_spec
    from export.trtllm.convert import default_build

    spec = load_spec(args.config)
    gpu = parse_gpu(args.gpu, False if args.no_fp8 else None)
    rep = plan_deployment(spec, gpu, gpus=args.gpus, nodes=args.nodes,
                          seq_len=args.seq_len or default_build(spec)["max_seq_len"],
                          batch=args.batch or DEFAULT_BUILD["max_batch_size"],
                          reserve=int(args.reserve_gib * GiB), kv_fraction=args.kv_fraction)
    print(json.dumps(rep, indent=1) if args.json else format_plan(rep, spec, top=args.top, source=args.source))
    return 0 if rep["fits"] else 1

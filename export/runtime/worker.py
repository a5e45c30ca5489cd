"""One rank of the engine: `python -m export.runtime.worker ...`, started by the driver (never by hand).

Joins the torch.distributed group (gloo on CPU, nccl with GPUs), loads its rank's weights, then
executes step commands read from stdin and answers each on the reply pipe. It exits when the
driver says so, when stdin closes, or (Linux) when the driver dies: no orphans.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from export.io.safetensors_format import torch_dtype
from export.mapping import Mapping
from export.runtime import wire
from export.runtime.model import load_decoder
from export.runtime.steps import Exit, Stepper
from export.sources import open_source
from export.spec import normalize_dtype


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the driver goes, then make sure it has not gone already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def join_group(args: argparse.Namespace, mapping: Mapping) -> tuple[dist.ProcessGroup, str]:
    """World group, plus this rank's tensor-parallel group (every rank creates every group, in order)."""
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    device = f"cuda:{args.rank % torch.cuda.device_count()}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{args.init}",
                            rank=args.rank, world_size=mapping.world_size, timeout=timedelta(seconds=args.timeout))
    groups = [dist.new_group(mapping.stage_ranks(s)) for s in range(mapping.pp)]
    return groups[mapping.pp_rank(args.rank)], device


def serve(args: argparse.Namespace) -> int:
    mapping = Mapping(args.tp, args.pp)
    group, device = join_group(args, mapping)
    _, _, make = open_source(args.source)
    dec = load_decoder(make(mapping, args.rank), dtype=torch_dtype(normalize_dtype(args.dtype)),
                       group=group, device=device)
    stepper = Stepper(dec)
    wire.send(args.reply_fd, ("ready", args.rank))
    stdin = sys.stdin.buffer.fileno()
    while True:
        try:
            cmd = wire.recv(stdin)
        except EOFError:
            return 0
        if isinstance(cmd, Exit):
            return 0
        try:
            wire.send(args.reply_fd, ("ok", stepper.run(cmd)))
        except Exception as e:  # report to the driver, which raises it; the rank stays up
            wire.send(args.reply_fd, ("error", f"rank {args.rank}: {type(e).__name__}: {e}\n"
                                               + traceback.format_exc()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.runtime.worker")
    p.add_argument("--source", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--init", required=True, help="rendezvous file (torch FileStore)")
    p.add_argument("--reply-fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="collective timeout, seconds")
    args = p.parse_args(argv)
    die_with_parent(args.parent)
    torch.set_num_threads(args.threads)
    try:
        return serve(args)
    except Exception as e:
        with contextlib.suppress(OSError):
            wire.send(args.reply_fd, ("error", f"rank {args.rank} failed to start: {type(e).__name__}: {e}\n"
                                               + traceback.format_exc()))
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

"""Torch vs ONNX Runtime on one engines/NAME, timed alternately (best of N) to cut through shared-CPU noise.

`bench decode --runtime torch,onnx` runs one runtime after the other, so load that comes and goes
between them skews its ratios; this interleaves every repeat. Usage:
    python scripts/bench_runtimes_interleaved.py engines/NAME [--repeats 5] [--prompt-len 128] [--steps 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from export.runtime.engine import Engine
    from export.runtime.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt = args.engine_dir / "checkpoint"
    engines = {"torch": Engine.start(ckpt), "onnx": Engine.start(ckpt, runtime="onnx")}
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, engines["torch"].spec.vocab, (8, args.prompt_len), generator=gen).tolist()
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):
        for rt, eng in engines.items():
            t = time.perf_counter()
            eng.generate(prompts, SamplingParams(max_tokens=1))
            _keep(best, (rt, "prefill"), (time.perf_counter() - t) / (8 * args.prompt_len))
            for b in (1, 8):
                steps = eng._steps(prompts[:b], SamplingParams(max_tokens=args.steps + 1))
                next(steps)
                t = time.perf_counter()
                n = sum(len(s) for s in steps)
                _keep(best, (rt, f"decode b{b}"), (time.perf_counter() - t) / n)
    for eng in engines.values():
        eng.close()
    print(f"{args.engine_dir}: best of {args.repeats}, runtimes alternating; tokens/s")
    for what in ("prefill", "decode b1", "decode b8"):
        t, o = 1 / best["torch", what], 1 / best["onnx", what]
        print(f"  {what:10} torch {t:8.1f}  onnx {o:8.1f}  onnx/torch {o / t:.2f}x")
    return 0


def _keep(best: dict, key: tuple[str, str], seconds_per_token: float) -> None:
    best[key] = min(best.get(key, float("inf")), seconds_per_token)


if __name__ == "__main__":
    sys.exit(main())

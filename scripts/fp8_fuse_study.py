"""FP8 fusion on the demo model: which requantization and which gate/up input scale (docs/fp8-fuse.md).

    .venv/bin/python scripts/fp8_fuse_study.py [--out out/fp8-fuse-study] [--eval-tokens 8192]

Quantizes the shipped Puzzle demo model to FP8 by a small calibration pass (tests/fp8_demo.py, until
`quantize` lands), fuses the bf16 and the FP8 model with the same plan (the attention-free run
without its last FFN, and the whole run), every FP8 candidate, and scores each candidate against
the fused bf16 model and against the unfused FP8 model (export/fusion/evaluate.py's metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout, and the test helper

from fp8_demo import write_fp8_demo  # noqa: E402

from export.demo.paths import DEMO_PUZZLE  # noqa: E402
from export.demo.study import write_demo_texts  # noqa: E402
from export.deployment_plan import attention_free_runs  # noqa: E402
from export.fusion.evaluate import evaluate  # noqa: E402
from export.fusion.fuse import fuse_checkpoint  # noqa: E402
from export.fusion.plan import FusionPlan  # noqa: E402
from export.spec import ModelSpec  # noqa: E402

CANDIDATES = [("refit", "derived"), ("max-scale", "derived"), ("refit", "members-max"),
              ("max-scale", "members-max")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/fp8-fuse-study")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    calib, heldout = write_demo_texts(out, chars=200_000)
    q = write_fp8_demo(DEMO_PUZZLE, out / "fp8", calib, tokens=args.calib_tokens)
    (run,) = attention_free_runs(ModelSpec.load(DEMO_PUZZLE))
    results = {}
    for label, group in (("last FFN excluded", [run[0], run[-2]]), ("whole run", [run[0], run[-1]])):
        plan = FusionPlan([tuple(group)])
        tag = f"{group[0]}-{group[1]}"
        bf = fuse_checkpoint(DEMO_PUZZLE, plan, out / f"bf16-{tag}", progress=False).out
        cands = []
        for requant, rule in CANDIDATES:
            r = fuse_checkpoint(q, plan, out / f"fp8-{tag}-{requant}-{rule}", progress=False, requant=requant,
                                input_rule=rule)
            cands.append(r.out)
            results[(label, requant, rule, "error")] = {x.name: x.rel_error for x in r.fp8}
        for base in (bf, q):
            for s in evaluate(base, cands, heldout, tokens=args.eval_tokens, progress=False)[1:]:
                results[(label, s.name, base.name)] = (s.kl_vs_base, s.top1_agreement, s.perplexity)
    ref = evaluate(DEMO_PUZZLE, [q, out / f"bf16-{run[0]}-{run[-2]}"], heldout, tokens=args.eval_tokens,
                   progress=False)
    for s in ref:
        print(f"vs bf16 source: {s.name}: KL {s.kl_vs_base:.3e} top-1 {s.top1_agreement:.2%} ppl {s.perplexity:.3f}")
    for k, v in results.items():
        print(" | ".join(map(str, k)), "|", json.dumps(v) if isinstance(v, dict) else
              f"KL {v[0]:.3e} top-1 {v[1]:.2%} ppl {v[2]:.3f}")


if __name__ == "__main__":
    main()

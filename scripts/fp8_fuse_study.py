"""FP8 fusion on the demo model: which requantization and which gate/up input scale (docs/fp8.md).

    .venv/bin/python scripts/fp8_fuse_study.py [--out out/fp8-fuse-study] [--eval-tokens 8192]

Quantizes the shipped Puzzle demo model to FP8 (`quantize`, KV cache FP8, 2048 calibration tokens),
fuses the bf16 and the FP8 model with the same plan (the attention-free run
without its last FFN, and the whole run), every FP8 candidate, and scores each candidate against
the fused bf16 model and against the unfused FP8 model (export/fusion/evaluate.py's metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout

import torch

from export.demo.paths import DEMO_PUZZLE
from export.demo.study import write_demo_texts
from export.deployment_plan import attention_free_runs
from export.fusion.calib import fused_input_amax, load_model, token_batch
from export.fusion.evaluate import evaluate
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import FusionPlan
from export.io.tokenizer import load_tokenizer
from export.quantize.checkpoint import quantize_checkpoint
from export.spec import ModelSpec

CANDIDATES = [("refit", "derived"), ("max-scale", "derived"), ("refit", "members-max"),
              ("max-scale", "members-max"), ("refit", "calibrated")]


@torch.inference_mode()
def ffn_errors(group: list[int], models: dict[str, Path], ids: torch.Tensor) -> dict[str, float]:
    """Relative L2 error of each model's FFN output for the group, on the held-out residual entering it
    (taken from the bf16 source), against the bf16 members' exact parallel sum sum_j FFN_j(norm_j(h))
    computed in fp32. The fused models compute it in their one block; "fp8" (the unfused FP8 model)
    as the parallel sum of its members, each with its own scales."""
    first, members = group[0], range(group[0], group[1] + 1)
    _, src = load_model(DEMO_PUZZLE)
    h = src.embed(ids)
    for i in range(first):
        h = src.block(i, h)
    ref = sum(src._swiglu(j, h) for j in members)
    out = {}
    for name, path in models.items():
        _, dec = load_model(path)
        got = sum(dec._swiglu(j, h) for j in members) if name == "fp8" else dec._swiglu(first, h)
        out[name] = float((got - ref).norm() / ref.norm())
    return out


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
    q = quantize_checkpoint(DEMO_PUZZLE, out / "fp8", calib, kv_cache="fp8", calib_tokens=args.calib_tokens,
                            progress=False).out
    (run,) = attention_free_runs(ModelSpec.load(DEMO_PUZZLE))
    results = {}
    ids = token_batch(heldout, load_tokenizer(DEMO_PUZZLE, None, kind="tokenizers"), 4096, 2048, 128)
    for label, group in (("last FFN excluded", [run[0], run[-2]]), ("whole run", [run[0], run[-1]])):
        plan = FusionPlan([tuple(group)])
        tag = f"{group[0]}-{group[1]}"
        bf = fuse_checkpoint(DEMO_PUZZLE, plan, out / f"bf16-{tag}", progress=False).out
        cands = []
        for requant, rule in CANDIDATES:
            amax = (fused_input_amax(q, plan.resolve(ModelSpec.load(q)), calib, tokens=args.calib_tokens)
                    if rule == "calibrated" else None)
            r = fuse_checkpoint(q, plan, out / f"fp8-{tag}-{requant}-{rule}", progress=False, requant=requant,
                                input_rule="derived" if amax else rule, input_amax=amax)
            results[(label, requant, rule, "gate input scale")] = next(x.input_scale for x in r.fp8 if "gate" in x.name)
            cands.append(r.out)
            results[(label, requant, rule, "error")] = {x.name: x.rel_error for x in r.fp8}
        models = {"bf16 fused": bf, "fp8": q, **{p.name: p for p in cands}}
        for name, e in ffn_errors(group, models, ids).items():
            results[(label, "FFN output error vs bf16 parallel sum", name)] = e
        for base in (bf, q):
            for s in evaluate(base, cands, heldout, tokens=args.eval_tokens, progress=False)[1:]:
                results[(label, s.name, base.name)] = (s.kl_vs_base, s.top1_agreement, s.perplexity)
    ref = evaluate(DEMO_PUZZLE, [q, out / f"bf16-{run[0]}-{run[-2]}"], heldout, tokens=args.eval_tokens,
                   progress=False)
    for s in ref:
        print(f"vs bf16 source: {s.name}: KL {s.kl_vs_base:.3e} top-1 {s.top1_agreement:.2%} ppl {s.perplexity:.3f}")
    for k, v in results.items():
        text = (json.dumps(v) if isinstance(v, dict) else f"{v:.4e}" if isinstance(v, float)
                else f"KL {v[0]:.3e} top-1 {v[1]:.2%} ppl {v[2]:.3f}")
        print(" | ".join(map(str, k)), "|", text)


if __name__ == "__main__":
    main()

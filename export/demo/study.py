"""The small-scale counterpart of the paper's 49B tables: analyze -> plan -> fuse -> evaluate.

    python -m export.demo.study PUZZLE [--calib TEXT --text HELDOUT] [--unpruned DIR] [--out DIR]

Fuses the Puzzle-style model's attention-free runs four ways (whole run vs last FFN excluded,
`fold` vs `last` norm), evaluates every variant against the Puzzle-style model on held-out text
and prints a markdown table (the unpruned parent, when given, is scored too).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from export.fusion.analyze import analyze_checkpoint
from export.fusion.evaluate import Score, evaluate
from export.fusion.fuse import fuse_checkpoint
from export.fusion.plan import PlanOptions, propose_plan
from export.io.atomic import atomic_write_text
from export.spec import ModelSpec


@dataclass(frozen=True)
class Variant:
    name: str
    exclude_last: bool
    norm: str


VARIANTS = (
    Variant("fused-excl-last-fold", True, "fold"),
    Variant("fused-excl-last-last", True, "last"),
    Variant("fused-whole-run-fold", False, "fold"),
    Variant("fused-whole-run-last", False, "last"),
)


@dataclass
class Study:
    scores: list[Score]
    groups: dict[str, list[list[int]]]
    timings: dict[str, float]


def run_study(puzzle: Path, calib: Path, text: Path, out: Path, *, unpruned: Path | None = None,
              tokens: int = 2048, eval_tokens: int = 4096, seq_len: int = 128, progress: bool = True) -> Study:
    """Every step a user would run, timed; fused checkpoints land in `out/<variant>`."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    analysis = analyze_checkpoint(puzzle, calib, out / "analysis", tokens=tokens, seq_len=seq_len,
                                  progress=progress, overwrite=True)  # the study's own outputs: rerunnable
    timings["analyze"] = time.perf_counter() - t
    spec = ModelSpec.load(puzzle)
    t = time.perf_counter()
    paths, groups = [], {}
    for v in VARIANTS:
        plan = propose_plan(spec, PlanOptions(exclude_last=v.exclude_last), analysis.dependency.matrix)
        if not plan.groups:
            continue
        plan.save(out / f"{v.name}.plan.json")
        paths.append(fuse_checkpoint(puzzle, plan, out / v.name, norm=v.norm, progress=progress,
                                     overwrite=True).out)
        groups[v.name] = [list(g) for g in plan.groups]
    timings["fuse"] = time.perf_counter() - t
    t = time.perf_counter()
    candidates = ([unpruned] if unpruned else []) + paths
    scores = evaluate(puzzle, candidates, text, tokens=eval_tokens, seq_len=seq_len, progress=progress)
    timings["evaluate"] = time.perf_counter() - t
    return Study(scores, groups, timings)


def write_demo_texts(out: Path, chars: int = 400_000) -> tuple[Path, Path]:
    """Calibration text from the demo corpus's training split, held-out text from its held-out split
    (the same stdlib split the demo models were trained and scored on)."""
    from export.demo.corpus import corpus_files, split

    paths = []
    for name, files in zip(("calib.txt", "heldout.txt"), split(corpus_files())):
        texts, n = [], 0
        for f in files:
            t = f.text()
            if t:
                texts.append(t)
                n += len(t)
            if n >= chars:
                break
        paths.append(out / name)
        atomic_write_text(paths[-1], "\n".join(texts))
    return paths[0], paths[1]


def markdown_table(study: Study) -> str:
    head = ("| model | groups fused | blocks | attention | FFN blocks | sync points / token | perplexity | "
            "KL vs Puzzle | top-1 agreement |\n|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for s in study.scores:
        g = ", ".join(f"[{a},{b}]" for a, b in study.groups.get(s.name, [])) or "-"
        rows.append(f"| {s.name} | {g} | {s.non_empty_layers} | {s.attention_layers} | {s.ffn_layers} | "
                    f"{s.sync_points_per_token} | {s.perplexity:.2f} | {s.kl_vs_base:.2e} | "
                    f"{s.top1_agreement:.1%} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.demo.study", description=__doc__.splitlines()[0])
    p.add_argument("puzzle", type=Path)
    p.add_argument("--calib", type=Path, default=None, help="default: the demo corpus's training split")
    p.add_argument("--text", type=Path, default=None, help="default: the demo corpus's held-out split")
    p.add_argument("--unpruned", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("out/fusion-study"))
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens for M")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for evaluate")
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    if args.calib is None or args.text is None:
        calib, text = write_demo_texts(args.out)
        args.calib, args.text = args.calib or calib, args.text or text
    study = run_study(args.puzzle, args.calib, args.text, args.out, unpruned=args.unpruned, tokens=args.tokens,
                      eval_tokens=args.eval_tokens, seq_len=args.seq_len)
    table = markdown_table(study)
    print(table)
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in study.timings.items()))
    atomic_write_text(args.out / "study.json", json.dumps({"timings": study.timings, "groups": study.groups,
                                                           "scores": [s.to_json() for s in study.scores]},
                                                          indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

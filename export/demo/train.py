"""The recipe that produces the shipped demo models: `python -m export.demo.train [--out DIR]`.

1. Corpus: stdlib `.py` files, held-out split by path hash; the file-list hash goes on the cards.
2. Tokenizer: byte-level BPE (vocab 4096) trained on the train split.
3. Base model: 12 layers, hidden 256, 8 heads / 2 kv heads, FFN widths varying per layer as in a
   pruned model; AdamW on random 256-token windows for a fixed wall-time budget.
4. Puzzle step: measure attention importance, drop attention in the least important run of 4
   middle layers, recover by KL distillation from the base model.
Both checkpoints are written (bf16, DeciLM config, tokenizer, card) atomically under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from export.card import table, write_card
from export.demo import heldout as ho
from export.demo.corpus import corpus_files, corpus_hash, split
from export.demo.hf_model import (
    build_model,
    demo_spec,
    load_model,
    logits_fn,
    sample,
    without_attention,
    write_checkpoint,
)
from export.demo.paths import MODELS_DIR
from export.demo.puzzle import attention_importance, choose_run, distill_loss
from export.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer, train_tokenizer
from export.errors import ExportError
from export.io.output import check_output, output_dir
from export.spec import ModelSpec

# Wider at the ends, narrow in the middle, as Puzzle-pruned parents are; sums to 4096 (size budget).
WIDTHS = (768, 512, 512, 256, 256, 256, 256, 256, 256, 256, 256, 512)
SELECTION_TOKENS = 4096  # held-out tokens used to rank attention layers


@dataclass
class Recipe:
    seed: int = 1234
    vocab: int = 4096
    widths: tuple[int, ...] = WIDTHS
    ctx: int = 256
    batch: int = 4  # many small steps beat few large ones this early in training (data- and step-starved)
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    base_minutes: float = 32.0  # + distillation + tokenizer/eval overhead stays inside the 45-minute budget
    puzzle_minutes: float = 8.0
    distill_lr: float = 5e-4
    run_length: int = 4
    threads: int = 2  # on an idle 2-core machine; use 1 when the cores are shared (2 oversubscribe: 3x slower)
    facts: dict = field(default_factory=dict)  # measured along the way, for the cards


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, frac: float, peak: float, r: Recipe) -> float:
    """Linear warmup by steps, cosine decay by elapsed fraction of the wall-time budget."""
    warm = min(1.0, (step + 1) / r.warmup_steps)
    return peak * warm * (r.min_lr_frac + (1 - r.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def prepare_data(r: Recipe):
    """(tokenizer, train token stream) and records the corpus facts."""
    files = corpus_files()
    train, held = split(files)
    r.facts.update(corpus_files=len(files), train_files=len(train), heldout_files=len(held),
                   corpus_sha256=corpus_hash(files), python=sys.version.split()[0])
    texts = [t for t in (f.text() for f in train) if t]
    t0 = time.time()
    tok = train_tokenizer(texts, r.vocab)
    order = list(range(len(texts)))
    random.Random(r.seed).shuffle(order)
    stream: list[int] = []
    for enc in tok.encode_batch([texts[i] for i in order]):
        stream += [BOS_ID, *enc.ids, EOS_ID]
    r.facts.update(train_bytes=sum(len(t.encode()) for t in texts), train_tokens=len(stream))
    log(f"tokenizer + encode: {time.time() - t0:.0f}s, {len(stream)} train tokens from {len(texts)} files")
    return tok, torch.tensor(stream, dtype=torch.long)


def batches(stream: torch.Tensor, r: Recipe, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - r.ctx - 1, (r.batch,), generator=gen)
        yield torch.stack([stream[s: s + r.ctx + 1] for s in starts.tolist()])


StepLoss = Callable[[torch.Tensor], torch.Tensor]


def timed_training(params, step_loss: StepLoss, stream: torch.Tensor, r: Recipe, minutes: float, peak: float,
                   tag: str, seed_offset: int) -> dict:
    """AdamW on random windows until the wall-time budget is spent; returns steps / losses / time."""
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=peak, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(r.seed + seed_offset)
    budget, t0, losses, step = minutes * 60, time.time(), [], 0
    for b in batches(stream, r, gen):
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac, peak, r)
        loss = step_loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 10 == 0:
            rate = step * r.batch * r.ctx / (time.time() - t0)
            log(f"{tag} step {step} loss {sum(losses[-10:]) / 10:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{rate:.0f} tok/s {100 * frac:.0f}%")
    tail = losses[-50:]
    return {"steps": step, "train_tokens_seen": step * r.batch * r.ctx, "wall_s": round(time.time() - t0, 1),
            "final_train_loss": sum(tail) / max(1, len(tail))}


def lm_loss(model) -> StepLoss:
    def f(b: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=b[:, :-1], use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
    return f


def kd_loss(student, teacher) -> StepLoss:
    def f(b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(input_ids=b[:, :-1], use_cache=False).logits
        return distill_loss(student(input_ids=b[:, :-1], use_cache=False).logits, t)
    return f


def evaluate(directory: Path, tok_dir: Path, r: Recipe) -> dict:
    """Figures for the card, measured on the bf16 checkpoint as written (reloaded from disk)."""
    _, model = load_model(directory)
    tok = ho.load_tokenizer(tok_dir)
    fn = logits_fn(model)
    test = ho.heldout_loss(fn, tok, ho.TEST_SLICE_TOKENS, r.ctx)
    full = ho.heldout_loss(fn, tok, ho.EVAL_TOKENS, r.ctx)
    prompt = ho.encode(tok, "def ")
    text = tok.decode(sample(model, [BOS_ID, *prompt], 60, eos_id=EOS_ID), skip_special_tokens=True)
    return {"heldout_loss": full, "heldout_ppl": ho.perplexity(full), "heldout_tokens": ho.EVAL_TOKENS,
            "test_slice_loss": test, "test_slice_ppl": ho.perplexity(test), "test_slice_tokens": ho.TEST_SLICE_TOKENS,
            "sample": "def " + text}


def ship(model, spec: ModelSpec, tok, target: Path, r: Recipe, title: str, extra: dict, notes: str,
         overwrite: bool = False) -> dict:
    """Write checkpoint + tokenizer + generation config, evaluate the written weights, add the card."""
    with output_dir(target, overwrite=overwrite) as tmp:
        nbytes = write_checkpoint(model, spec, tmp)
        save_tokenizer(tok, tmp, spec.max_position_embeddings)
        gen_cfg = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        m = evaluate(tmp, tmp, r)
        facts = {**extra, **{k: v for k, v in m.items() if k != "sample"}, "weight_bytes": nbytes,
                 **{k: v for k, v in r.facts.items()}, "seed": r.seed}
        body = (f"{notes}\n\n## Measured\n\n{table(list(facts.items()))}\n\n"
                f"## Greedy sample from `def `\n\n```python\n{m['sample']}\n```\n\n"
                f"## Recipe\n\n```json\n{json.dumps({k: v for k, v in asdict(r).items() if k != 'facts'})}\n```\n")
        write_card(tmp, facts, title, body)
    log(f"wrote {target}: held-out loss {m['heldout_loss']:.3f} ppl {m['heldout_ppl']:.2f}")
    return m


BASE_NOTES = """A tiny Llama-style code model trained from scratch on the CPython standard library (`.py` files of
the interpreter that ran the recipe; test suites and site-packages excluded; 5% of files held out by path hash).
Byte-level BPE tokenizer (vocab 4096, `<|pad|>`=0, `<|bos|>`=1, `<|eos|>`=2). 12 layers, hidden 256, 8 heads
(head_dim 32), 2 kv heads, RoPE theta 10000, tied embeddings, per-layer FFN widths as a pruned model's, stored as a
DeciLM (`nemotron-nas`) config. Trained with context 256 (max_position_embeddings is 512). bf16 weights.
Reproduce: `python -m export.demo.train`. Perplexities are per BPE token on the held-out split."""

PUZZLE_NOTES = """The Puzzle-style child of the `llama` demo model: attention removed (no-op, no q/k/v/o and no
input_layernorm) in a contiguous run of middle layers chosen by measured importance (held-out loss increase when
only that layer's attention is skipped), then recovered by KL distillation from the unpruned teacher on the same
training stream. The result has an attention-free run of FFN-only blocks, the input FFN-Fusion needs."""


def run(out: Path, r: Recipe, overwrite: bool = False) -> None:
    torch.manual_seed(r.seed)
    torch.set_num_threads(r.threads)
    t_all = time.time()
    tok, stream = prepare_data(r)
    spec = demo_spec(tok.get_vocab_size(), list(r.widths),
                     passthrough={"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    model = build_model(spec, seed=r.seed).train()
    base = timed_training(list(model.parameters()), lm_loss(model), stream, r, r.base_minutes, r.lr, "base", 0)
    model.eval()
    ship(model, spec, tok, out / "llama", r, "Demo model: llama (unpruned)", base, BASE_NOTES, overwrite)

    sel = ho.windows(ho.heldout_tokens(tok, SELECTION_TOKENS), r.ctx)
    base_loss, scores = attention_importance(model, sel)
    chosen = choose_run(scores, r.run_length, edge=len(scores) // 4)  # a middle run, as in Puzzle's models
    log(f"importance (loss increase): {[round(s, 4) for s in scores]} -> run {chosen}")
    child_spec = without_attention(spec, chosen)
    student = build_model(child_spec)
    student.load_state_dict(model.state_dict(), strict=False)  # every child tensor exists in the parent
    pruned_loss = ho.mean_nll(logits_fn(student), sel)
    student.train()
    kd = timed_training(list(student.parameters()), kd_loss(student, model), stream, r, r.puzzle_minutes,
                        r.distill_lr, "distill", 1)
    student.eval()
    extra = {"attention_removed": ",".join(map(str, chosen)),
             "importance": ",".join(f"{s:.4f}" for s in scores), "selection_base_loss": base_loss,
             "selection_loss_pruned_before_distill": pruned_loss, "distill_steps": kd["steps"],
             "distill_wall_s": kd["wall_s"], "final_distill_kl": kd["final_train_loss"],
             "base_steps": base["steps"], "base_wall_s": base["wall_s"]}
    ship(student, child_spec, tok, out / "puzzle", r, "Demo model: puzzle (attention-free run)", extra,
         PUZZLE_NOTES, overwrite)
    log(f"recipe done in {time.time() - t_all:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.demo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=MODELS_DIR, help="writes OUT/llama and OUT/puzzle")
    p.add_argument("--minutes", type=float, default=Recipe.base_minutes, help="base training wall time")
    p.add_argument("--puzzle-minutes", type=float, default=Recipe.puzzle_minutes, help="distillation wall time")
    p.add_argument("--threads", type=int, default=Recipe.threads)
    p.add_argument("--batch", type=int, default=Recipe.batch, help="windows per step")
    p.add_argument("--seed", type=int, default=Recipe.seed)
    p.add_argument("--overwrite", action="store_true", help="replace OUT/llama and OUT/puzzle written by this toolkit")
    a = p.parse_args(argv)
    try:
        for name in ("llama", "puzzle"):  # refuse now, not after the training minutes
            check_output(a.out / name, overwrite=a.overwrite)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(a.out, Recipe(seed=a.seed, base_minutes=a.minutes, puzzle_minutes=a.puzzle_minutes, threads=a.threads,
                      batch=a.batch), a.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())

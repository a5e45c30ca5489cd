"""`generate`: text in, text out through the reference runtime (any tp x pp), with tokens/s."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export.commands.registry import command, prompt_args, with_args
from export.io.paths import FOLLOW_SYMLINKS_HELP
from export.runtime import registry

# sampling setting -> its flag, so a bad value is refused naming the flag
FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
         "seed": "--seed"}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", type=Path, help="HF checkpoint dir, TRT-LLM checkpoint dir, or engines/NAME")
    prompt_args(p, "the prompt text; - reads it from standard input",
                "a user turn, rendered with the checkpoint's chat template into the prompt")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel worker processes (default: 1, "
                                                        "or the TRT-LLM checkpoint's own)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: 1, or the checkpoint's own)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt first")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--dtype", default="float32", help="fp32 | bf16 | fp16 (compute dtype)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: beside the weights)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--runtime", choices=registry.names(), default="torch", help=registry.describe())
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--follow-symlinks", action="store_true", help=FOLLOW_SYMLINKS_HELP)


@command("generate", "generate text with the reference runtime (tp/pp worker processes) and report tokens/s")
@with_args(_args)
def _cmd_generate(args: argparse.Namespace) -> int:
    from export.io.paths import set_default_follow_symlinks
    from export.runtime.sampling import SamplingParams
    from export.runtime.text import generate_text

    set_default_follow_symlinks(args.follow_symlinks)  # the weights are opened in worker processes
    params = SamplingParams.from_request(FLAGS, max_tokens=args.max_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompt = _prompt_text(args)
    stream = not args.json
    echo = [stream and not args.no_echo]  # the prompt is echoed once the engine runs: a refusal prints alone

    def on_text(text: str) -> None:
        if echo[0]:
            print(prompt, end="")
            echo[0] = False
        print(text, end="", flush=True)
    res = generate_text(args.ckpt, prompt, params, tp=args.tp, pp=args.pp, dtype=args.dtype,
                        tokenizer=args.tokenizer, stop_at_eos=not args.ignore_eos, threads=args.threads,
                        runtime=args.runtime, on_text=on_text if stream else None)
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
        return 0
    on_text("")  # a generation with no text still shows its prompt
    print(flush=True)
    print(f"[tp={res.tp} pp={res.pp}] {res.prompt_tokens} prompt tokens, {len(res.new_tokens)} new tokens; "
          f"prefill {res.prefill_s * 1e3:.1f} ms, decode {res.tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0


def _prompt_text(args: argparse.Namespace) -> str:
    """The prompt (standard input for -), or the --chat turn rendered with the checkpoint's chat template."""
    from export.chat import prompt_or_chat

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return prompt_or_chat(prompt, args.chat, args.system, args.ckpt, tokenizer=args.tokenizer)

"""The command registry: each `export.commands` module registers its subcommands here.

`export.cli` builds the parser from `COMMANDS` and dispatches; a stage adds a command by
decorating its handler, never by editing the CLI.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str) -> Callable[[Callable], Callable]:
    """Register `fn(args) -> exit code`; its `configure(parser)` attribute adds the flags."""
    def deco(fn: Callable) -> Callable:
        COMMANDS[name] = (help_text, getattr(fn, "configure", lambda p: None), fn)
        return fn
    return deco


def checkpoint_writer_args(p: argparse.ArgumentParser) -> None:
    """The flags every command that writes an HF checkpoint shares (`fuse`, `quantize`)."""
    from export.commands.fusion import byte_size
    from export.io.paths import FOLLOW_SYMLINKS_HELP

    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous output of this toolkit (anything else is refused)")
    p.add_argument("--max-shard-size", type=byte_size, default=5 << 30, help="safetensors shard size")
    p.add_argument("--follow-symlinks", action="store_true", help=FOLLOW_SYMLINKS_HELP)


def with_args(configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        fn.configure = configure  # type: ignore[attr-defined]
        return fn
    return deco


def default_path(*parts: str) -> Path:
    """A path inside the repository (demo model, engines/), independent of the cwd."""
    return Path(__file__).resolve().parents[2].joinpath(*parts)


def prompt_args(p: argparse.ArgumentParser, prompt_help: str, chat_help: str) -> None:
    """A positional prompt, or --chat (with --system) rendered by the checkpoint's chat template."""
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("prompt", nargs="?", help=prompt_help)
    text.add_argument("--chat", default=None, metavar="TEXT", help=chat_help)
    p.add_argument("--system", default=None, metavar="TEXT",
                   help='--chat: the system turn, e.g. "detailed thinking on" (default: the template\'s own)')


def comma_ints(flag: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, the error naming `flag`."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} wants comma-separated integers, got {text!r}") from None
    return parse


def print_report(table: str, report: dict[str, Any], json_out: Path | None) -> int:
    """A benchmark's table and its JSON on stdout; the JSON also to `json_out` (atomically)."""
    from export.io.atomic import atomic_write_text

    text = json.dumps(report, indent=2)
    print(table)
    print(text)
    if json_out:
        atomic_write_text(json_out, text + "\n")
    return 0

"""The command registry: each `export.commands` module registers its subcommands here.

`export.cli` builds the parser from `COMMANDS` and dispatches; a stage adds a command by
decorating its handler, never by editing the CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str) -> Callable[[Callable], Callable]:
    """Register `fn(args) -> exit code`; its `configure(parser)` attribute adds the flags."""
    def deco(fn: Callable) -> Callable:
        COMMANDS[name] = (help_text, getattr(fn, "configure", lambda p: None), fn)
        return fn
    return deco


def with_args(configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        fn.configure = configure  # type: ignore[attr-defined]
        return fn
    return deco


def default_path(*parts: str) -> Path:
    """A path inside the repository (demo model, engines/), independent of the cwd."""
    return Path(__file__).resolve().parents[2].joinpath(*parts)

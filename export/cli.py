"""`python -m export <command>`: a thin argparse layer over typed library functions.

Each subcommand lives in an `export.commands` module, registered in `export.commands.registry`,
and imports its stage lazily, so `inspect` starts fast and works without torch-heavy modules.
"""

from __future__ import annotations

import argparse
import logging
import sys

from export.commands.registry import COMMANDS
from export.errors import ExportError


def _load_extensions() -> None:
    """Stages register their own subcommands; a stage not yet present is simply absent."""
    import importlib
    import pkgutil

    import export.commands as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"export.commands.{mod.name}")


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's default in its help, as `--help` shows it in HF's and vLLM's CLIs; options
    whose help already explains the default, and flags that are off by default, are left alone."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default not in (None, False)
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from export import __version__

    _load_extensions()
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handler = COMMANDS[args.command][2]
    try:
        return handler(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


"""`python -m export <command>`: a thin argparse layer over typed library functions.

Each subcommand lives in its own `_cmd_*` function and imports its stage lazily, so
`inspect` starts fast and works without torch-heavy modules being loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from export.errors import ExportError

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


# ---- inspect ---------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="config.json, a checkpoint directory holding one, or an engines/NAME directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to plan for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to plan for")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the config's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--target", choices=("trtllm", "cpu"), default="trtllm",
                   help="what the exit status judges the layout for: trtllm (convert, trtllm-build; the default) "
                        "or cpu (the reference engine: verify, generate), which runs stages trtllm-build cannot")


@command("inspect", "plan a deployment from config.json: layers, parameters, KV cache, per-rank and "
                    "per-stage bytes")
@with_args(_inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    from export.mapping import Mapping
    from export.planning import format_report, plan_report
    from export.sources import load_spec
    from export.spec import normalize_dtype

    spec = load_spec(args.path)
    dtype = normalize_dtype(args.dtype) if args.dtype else None
    rep = plan_report(spec, Mapping(args.tp, args.pp), dtype)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0 if rep["targets"][args.target]["ok"] else 2


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


def default_path(*parts: str) -> Path:
    """A path inside the repository (demo model, engines/), independent of the cwd."""
    return Path(__file__).resolve().parent.parent.joinpath(*parts)

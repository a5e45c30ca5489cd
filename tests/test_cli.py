"""The CLI behaves like the ones HF / TRT-LLM / vLLM users know: --version, documented flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from export import __version__
from export.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, nested ones (`bench decode`) included."""
    parser = parser or build_parser()
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                out[prefix + name] = sp
                out |= _subparsers(sp, f"{prefix}{name} ")
    return out


@pytest.mark.slow
def test_version():
    out = subprocess.run([sys.executable, "-m", "export", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"python -m export {__version__}"


@pytest.mark.slow
def test_query_without_a_server_is_one_clear_error_every_time():
    """No traceback from the gRPC stream's race ("the stream is no longer in valid state")."""
    from export.triton.server import free_port

    port = free_port()
    for protocol in ("grpc", "grpc", "grpc", "http"):
        out = subprocess.run([sys.executable, "-m", "export", "query", "hi", "--url", f"127.0.0.1:{port}",
                              "--protocol", protocol], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: cannot reach") and "Traceback" not in out.stderr
        assert "refused" in out.stderr.lower()


def test_every_flag_has_help_and_every_default_is_shown():
    missing, hidden = [], []
    for name, sp in _subparsers().items():
        fmt = sp._get_formatter()
        for a in sp._actions:
            if not a.option_strings or a.dest == "help":
                continue
            if not a.help:
                missing.append(f"{name} {a.option_strings[0]}")
            elif a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in fmt._get_help_string(a):
                hidden.append(f"{name} {a.option_strings[0]}")
    assert not missing, f"flags without help: {missing}"
    assert not hidden, f"defaults not shown: {hidden}"


@pytest.mark.slow
def test_generate_never_asks_to_trust_the_checkpoints_remote_code():
    """The demo configs carry auto_map (they load in transformers); loading only the tokenizer must
    neither run nor ask about that code (transformers asks on stdin when trust_remote_code is unset)."""
    out = subprocess.run([sys.executable, "-m", "export", "generate", "export/demo/models/puzzle", "def ",
                          "--max-tokens", "2"], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "custom code" not in out.stdout + out.stderr and out.stdout.startswith("def ")

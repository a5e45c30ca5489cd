"""The commands in README.md and docs/*.md work as written, so the docs cannot drift from the CLI.

Every `python -m export ...` line (in a fenced block, or an inline code span) is parsed by the real
argument parser, with synopsis notation filled in (`[--opt X]` kept, `a|b` as its first choice,
placeholders such as `N` or `CKPT` given a value): a renamed or removed flag fails here. Commands
with no placeholder whose subcommand is cheap on the demo model are run for real, in the order the
page gives them (later ones use earlier outputs), from a scratch directory in which `export/` and
`tests/` are the repository's, so what they write stays out of the checkout. Where a page quotes
a command's output (a python/text block right after it), the command must print exactly that.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from export.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN = {"inspect", "plan", "fuse", "convert", "generate", "verify", "clean", "plan-deployment"}
VALUES = {"N": "2", "M": "2", "T": "0.7", "W": "1024", "L": "512", "B": "4", "HOST:PORT": "127.0.0.1:8001"}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]*(?:/[A-Z0-9_]+)?\b|\.\.\.|<\w+>|\[|\{")


def page_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) for each `python -m export...` command on the page."""
    out, in_block, pending = [], False, ""
    for no, line in enumerate(page.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if in_block:
            text = (pending + " " + line.strip()).strip()
            if text.endswith("\\"):
                pending = text[:-1]
                continue
            pending = ""
            m = re.search(r"(?:\.venv/bin/)?python -m export\b.*", text)
            if m:
                out.append((no, strip_comment(m.group(0))))
        else:
            out += [(no, m.group(1)) for m in re.finditer(r"`((?:\.venv/bin/)?python -m export\b[^`]*)`", line)]
    return [(no, cmd.removeprefix(".venv/bin/")) for no, cmd in out]


def strip_comment(cmd: str) -> str:
    return re.sub(r"\s+#\s.*$", "", cmd).strip()


def words(cmd: str) -> list[str]:
    """shlex, plus bash's $'...' quoting (which the docs use for a prompt with a newline)."""
    cmd = re.sub(r"\$'((?:[^'\\]|\\.)*)'", lambda m: shlex.quote(m.group(1).encode().decode("unicode_escape")), cmd)
    return shlex.split(cmd)


def fill_synopsis(cmd: str) -> str:
    """Synopsis notation -> one concrete command line (every optional part included)."""
    cmd = re.sub(r"\[[^\[\]]*\.\.\.[^\[\]]*\]", "", cmd)  # [engines/OTHER ...]
    cmd = cmd.replace("...", "")
    cmd = re.sub(r"\{([^,}]*)[^}]*\}", r"\1", cmd)  # {a,b} -> a
    while "[" in cmd:
        cmd = re.sub(r"\[([^\[\]]*)\]", r" \1 ", cmd)
    cmd = re.sub(r"(\S+?)\|\S+", r"\1", cmd)  # a|b|c -> a
    return " ".join(VALUES.get(w, w) for w in cmd.split())


ALL = [(page, no, cmd) for page in PAGES for no, cmd in page_commands(page)]


@pytest.mark.parametrize(("page", "no", "cmd"), ALL, ids=[f"{p.name}:{n}" for p, n, _ in ALL])
def test_every_documented_command_parses(page, no, cmd):
    argv = words(fill_synopsis(cmd))
    assert argv[:2] == ["python", "-m"], cmd
    module = argv[2]
    if module != "export":  # `python -m export.demo.train` and the like: the module must exist
        assert importlib.util.find_spec(module) is not None, f"{page.name}:{no}: no module {module}"
        return
    if argv[3:] in ([], ["<command>"]):
        return
    try:
        build_parser().parse_args(argv[3:])
    except SystemExit as e:
        raise AssertionError(f"{page.name}:{no}: `{cmd}` does not parse") from e


def runnable(cmd: str) -> bool:
    argv = cmd.split()
    return (len(argv) > 3 and argv[2] == "export" and argv[3] in RUN
            and not PLACEHOLDER.search(re.sub(r"(['\"]).*?\1", "", cmd)))


RUNS = [(page, [(no, cmd) for no, cmd in page_commands(page) if runnable(cmd)]) for page in PAGES]


@pytest.mark.slow
@pytest.mark.parametrize(("page", "cmds"), [r for r in RUNS if r[1]], ids=[p.name for p, c in RUNS if c])
def test_concrete_commands_run_on_the_demo_model(page, cmds, tmp_path):
    for name in ("export", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for no, cmd in cmds:
        line = cmd.replace("python -m export", f"{shlex.quote(sys.executable)} -m export", 1)
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{page.name}:{no}: `{cmd}` exited {r.returncode}:\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, f"{page.name}:{no}: {r.stderr[-2000:]}"
        shown = quoted_output(page, no)
        if shown is not None:  # the page quotes what it prints: it must be what it prints
            assert r.stdout.strip() == shown.strip(), f"{page.name}:{no}: the quoted output differs:\n{r.stdout}"


def quoted_output(page: Path, no: int) -> str | None:
    """The ```python / ```text block that opens within 4 lines after line `no` (past the command's
    own closing fence), if any: the output the page claims for that command."""
    lines = page.read_text().splitlines()
    for k in range(no, min(no + 5, len(lines))):
        if lines[k].strip() in ("```python", "```text"):
            end = next(i for i in range(k + 1, len(lines)) if lines[i].strip() == "```")
            return "\n".join(lines[k + 1:end])
    return None

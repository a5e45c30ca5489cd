"""Model cards: a README.md whose YAML front matter carries the facts and measured figures.

The front matter is flat `key: value` lines so tests (and other stages) read the card's numbers
back with `card_facts(dir)` instead of scraping prose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_card(directory: Path, facts: dict[str, Any], title: str, body: str) -> None:
    front = "\n".join(f"{k}: {_fmt(v)}" for k, v in facts.items())
    (Path(directory) / "README.md").write_text(f"---\n{front}\n---\n\n# {title}\n\n{body.strip()}\n")


def card_facts(directory: str | Path) -> dict[str, str]:
    """The front-matter facts of `directory/README.md` as strings."""
    text = (Path(directory) / "README.md").read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{directory}/README.md has no front matter")
    front = text[4:].split("\n---\n", 1)[0]
    return dict(line.split(": ", 1) for line in front.splitlines() if ": " in line)


def table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)

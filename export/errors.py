"""Error types that every stage raises, so the CLI can print them without a traceback."""

from __future__ import annotations


class ExportError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible request."""


class ConfigError(ExportError):
    """A config.json field is missing, malformed or unsupported."""


class CheckpointError(ExportError):
    """A checkpoint on disk does not match what its description needs.

    Carries every problem found, so one run reports them all. One problem is one line
    (`PATH: tensor X: ...`), so the CLI's `error:` line names the file and tensor at fault;
    several are listed one per line under a count.
    """

    def __init__(self, problems: list[str] | str, path: object = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = path
        where = f"{path}: " if path is not None else ""
        if len(self.problems) == 1:
            super().__init__(f"{where}{self.problems[0]}")
        else:
            lines = "\n  - ".join(self.problems)
            super().__init__(f"{where}{len(self.problems)} problem(s):\n  - {lines}")

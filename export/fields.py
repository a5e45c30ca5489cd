"""Typed reads of JSON config fields that collect every problem instead of stopping at the first.

Configs are user input: a field may be missing, a string where a number belongs ("12"), a bool
where an int belongs (`True` is an `int` in Python), NaN, negative, or a list. Each getter checks
its field strictly (no coercion: a string is refused, never parsed) and records a problem naming
the field, so `ModelSpec` parsing reports all of a config's problems in one message.
"""

from __future__ import annotations

import math
from typing import Any

from export.errors import ConfigError

MISSING: Any = object()


class Fields:
    """One JSON object (`where` names it in messages), with problems collected into `problems`."""

    def __init__(self, obj: Any, where: str, problems: list[str] | None = None) -> None:
        self.where = where
        self.problems = problems if problems is not None else []
        self.obj: dict[str, Any] = obj if isinstance(obj, dict) else {}
        if not isinstance(obj, dict):
            self.problems.append(f"{where}: must be a JSON object, got {_show(obj)}")

    def bad(self, key: str, value: Any, why: str) -> None:
        self.problems.append(f"{self.where}: field {key!r} = {_show(value)}: {why}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def _value(self, key: str, default: Any) -> Any:
        val = self.obj.get(key)
        if val is None:
            if default is MISSING:
                self.problems.append(f"{self.where}: required field {key!r} is missing")
            return default
        return val

    def pos_int(self, key: str, default: Any = MISSING) -> Any:
        """A positive int (not a bool, not a string); `default` when absent or null."""
        val = self._value(key, default)
        if val is default:
            return default
        if not is_int(val) or val <= 0:
            self.bad(key, val, "must be a positive integer")
            return default if default is not MISSING else None
        return val

    def pos_float(self, key: str, default: Any = MISSING) -> Any:
        """A finite number > 0 (ints allowed, bools and strings not), as float."""
        val = self._value(key, default)
        if val is default:
            return default
        if not is_number(val) or not math.isfinite(val) or val <= 0:
            self.bad(key, val, "must be a finite number > 0")
            return default if default is not MISSING else None
        return float(val)

    def flag(self, key: str, default: bool) -> bool:
        """A real JSON bool: `"false"` is refused rather than read as true."""
        val = self.obj.get(key)
        if val is None:
            return default
        if not isinstance(val, bool):
            self.bad(key, val, "must be true or false")
            return default
        return val

    def raise_if_any(self) -> None:
        if self.problems:
            raise config_error(self.problems)


def is_int(val: Any) -> bool:
    return isinstance(val, int) and not isinstance(val, bool)


def is_number(val: Any) -> bool:
    return isinstance(val, (int, float)) and not isinstance(val, bool)


def config_error(problems: list[str]) -> ConfigError:
    """All problems on one line: the first names the field, the rest follow after '; '."""
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(f"{len(problems)} problems: " + "; ".join(problems))


def _show(val: Any) -> str:
    text = repr(val)
    return text if len(text) <= 60 else text[:57] + "..."

"""The manifest parser's problem collector: typed readers of YAML values that record what is
wrong (naming the key) and return ``None``, so every problem is reported at once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from acctattr.files import path_problem
from acctattr.runs import formats
from acctattr.runs.manifest_spec import Ref


class Collector:
    """Gathers problems while parsing; values that fail become ``None``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}" if where else msg)

    def mapping(self, value: Any, where: str, allowed: set[str], required: set[str]) -> dict:
        if not isinstance(value, dict):
            self.add(where, f"expected a mapping with keys {sorted(required) or sorted(allowed)}, "
                     f"got {kind_of(value)}")
            return {}
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                self.add(where, f"unknown key {key!r}; allowed keys are "
                         f"{', '.join(sorted(allowed))}")
        for key in sorted(required):
            if key not in value:
                self.add(where, f"missing required key '{key}'")
        return {k: v for k, v in value.items() if isinstance(k, str) and k in allowed}

    def number(self, value: Any, where: str, *, lo: float | None = 0.0, hi: float | None = None,
               hi_open: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(where, f"expected a number, got {kind_of(value)}")
            return None
        try:
            x = float(value)
        except OverflowError:  # an integer beyond float range (YAML reads 1 and 400 zeros)
            self.add(where, f"must be finite, got an integer of {len(str(abs(value)))} digits, "
                     "beyond the float range")
            return None
        if not math.isfinite(x):
            self.add(where, f"must be finite, got {value!r}")
            return None
        if lo is not None and x < lo:
            self.add(where, f"must be >= {lo:g}, got {value!r}")
            return None
        if hi is not None and (x > hi or (hi_open and x >= hi)):
            self.add(where, f"must be {'<' if hi_open else '<='} {hi:g}, got {value!r}")
            return None
        return x

    def integer(self, value: Any, where: str, *, lo: int = 0,
                hi: int = formats.MAX_STEPS) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(where, f"expected an integer, got {kind_of(value)}")
            return None
        if value < lo:
            self.add(where, f"must be >= {lo}, got {value}")
            return None
        if value > hi:  # a count this large is a typo or garbage, and overflows indexes
            self.add(where, f"must be <= {hi:.0e}, got {value}")
            return None
        return value

    def boolean(self, value: Any, where: str) -> bool | None:
        if not isinstance(value, bool):
            self.add(where, f"expected true or false, got {kind_of(value)}")
            return None
        return value

    def string(self, value: Any, where: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.add(where, f"expected a non-empty string, got {kind_of(value)}")
            return None
        return value

    def path(self, value: Any, where: str, *, must_exist: bool = True) -> Path | None:
        text = self.string(value, where)
        if text is None:
            return None
        if "\x00" in text:
            self.add(where, f"{text!r}: the path holds a NUL byte")
            return None
        p = Path(text) if Path(text).is_absolute() else self.root / text
        try:
            p = p.resolve()
        except (OSError, RuntimeError, ValueError):
            pass  # a symlink loop or an unusable name: path_problem below says which
        problem = path_problem(p) if must_exist else None
        if problem == "not found":
            self.add(where, f"{text} not found (looked for {p})")
            return None
        if problem is not None:
            self.add(where, f"{text}: {problem} (at {p})")
            return None
        return p

    def ref(self, value: Any, where: str) -> Ref | None:
        text = self.string(value, where)
        if text is None:
            return None
        target, sep, func = text.rpartition(":")
        if not sep or not target or not func.isidentifier():
            self.add(where, f"expected FILE.py:FUNC or package.module:FUNC, got {text!r}")
            return None
        if target.endswith(".py"):
            p = self.path(target, where)
            return None if p is None else Ref(text, p, None, func)
        if not all(part.isidentifier() for part in target.split(".")):
            self.add(where, f"{target!r} is neither a .py file nor a module name")
            return None
        return Ref(text, None, target, func)


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {value!r}"
    return f"a {type(value).__name__}"

"""Shared by the report, gate and diff tests: one real run of the digits sample, cached.

The digits sample takes seconds to compute, so the tests compute it once per session,
through the command line (so that run's stdout and stderr are checked as a user sees
them), and keep the Result object the pipeline returned.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from acctattr import pipeline
from acctattr.cli import app

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str | Path) -> Any:
    """The acctattr command line, in process (typer's CliRunner): its Result."""
    return CliRunner().invoke(app, [str(a) for a in args])


DIGITS = ROOT / "sample_runs" / "digits" / "manifest.yaml"
TRAP = "1"  # the digits sample's trap group: other classes wearing the shortcut's patch


@dataclass(frozen=True)
class DigitsRun:
    result: pipeline.Result
    stdout: str
    stderr: str
    exit_code: int

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.stdout)


@functools.cache
def digits_run() -> DigitsRun:
    """`acctattr run digits --estimator frozen --format json --per-example`, once."""
    seen: list[pipeline.Result] = []
    real = pipeline.run

    def recording(*args: Any, **kwargs: Any) -> pipeline.Result:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    pipeline.run = recording  # type: ignore[assignment]
    try:
        out = CliRunner().invoke(app, ["run", str(DIGITS), "--estimator", "frozen",
                                       "--format", "json", "--per-example", "--progress"])
    finally:
        pipeline.run = real  # type: ignore[assignment]
    assert out.exit_code == 0, out.stderr
    return DigitsRun(seen[0], out.stdout, out.stderr, out.exit_code)


def invoke(monkeypatch: Any, args: list[str], result: pipeline.Result | None = None) -> Any:
    """Run the CLI with pipeline.run answering ``result`` (the digits run by default)."""
    cached = result if result is not None else digits_run().result
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: cached)
    return CliRunner().invoke(app, args)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every GFM table in ``text`` as rows of cells; asserts each is well formed.

    A table is a header row, a separator row of ---/---:/:--- cells, then body rows, all
    with the same number of cells (escaped pipes do not split cells).
    """
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            rows = [_cells(r) for r in block]
            assert len(rows) >= 2, block
            assert all(c.strip(":").strip("-") == "" and "-" in c for c in rows[1]), rows[1]
            assert len({len(r) for r in rows}) == 1, rows
            tables.append([rows[0], *rows[2:]])
            block = []
    return tables


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    cells, cur, i = [], "", 1
    while i < len(line) - 1:
        if line[i] == "\\" and i + 1 < len(line) - 1:
            cur += line[i:i + 2]
            i += 2
            continue
        if line[i] == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += line[i]
        i += 1
    cells.append(cur.strip())
    return cells

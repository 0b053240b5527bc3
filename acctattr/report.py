"""Rendering results: the rich table, JSON (SPEC section 5) and stderr progress.

The only module that imports rich. Depends on the result dataclasses only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from acctattr.pipeline import Progress as ProgressFn
from acctattr.pipeline import Result

SCHEMA = "acctattr.effects/1"
_BAR = 12


def _num(x: float) -> float | None:
    """Stable float formatting: 10 significant digits, so noise below that never shows."""
    if x != x or x in (float("inf"), float("-inf")):
        return None
    return float(f"{x:.10g}")


def to_dict(result: Result) -> dict[str, Any]:
    """The JSON document as an ordered dict (field order is part of the contract)."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "metric": {"name": result.metric, "higher_is_better": result.higher_is_better},
        "estimator": {"name": result.estimator, "evaluate": result.evaluate},
        "n_examples": result.n_examples,
        "final_value": _num(result.final_value),
        "stages": [],
    }
    for s in result.stages:
        row: dict[str, Any] = {
            "name": s.name, "rank": s.rank, "effect": _num(s.effect), "verdict": s.verdict,
            "share": _num(s.share), "counterfactual_value": _num(s.counterfactual_value),
        }
        if s.groups is not None:
            row["groups"] = {g: _num(v) for g, v in s.groups.items()}
        doc["stages"].append(row)
    if result.examples is not None:
        doc["examples"] = [
            {"index": e.index, **({"group": e.group} if e.group is not None else {}),
             "effects": {k: _num(v) for k, v in e.effects.items()}}
            for e in result.examples
        ]
    return doc


def to_json(result: Result) -> str:
    return json.dumps(to_dict(result), indent=2, allow_nan=False) + "\n"


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


def to_table(result: Result, *, color: bool | None = None, width: int | None = None) -> str:
    """The ranked table as text (ANSI colours only when ``color`` and a terminal allow)."""
    direction = "higher is better" if result.higher_is_better else "lower is better"
    table = Table(
        title=f"Stage effects on {result.metric} ({direction}): final "
              f"{result.final_value:.4g} over {result.n_examples} examples",
        caption=f"estimator {result.estimator}, evaluation {result.evaluate}. effect = "
                "final value minus the value had the stage never run",
    )
    table.add_column("rank", justify="right")
    table.add_column("stage")
    table.add_column("effect", justify="right")
    table.add_column("share", justify="right")
    table.add_column("verdict")
    table.add_column("", no_wrap=True)
    group_names = list(result.stages[0].groups or {}) if result.stages else []
    for g in group_names:
        table.add_column(f"group {g}", justify="right")
    for s in result.stages:
        style = {"hurt": "red", "helped": "green"}.get(s.verdict, "")
        bar = Text("█" * max(1, round(s.share * _BAR)) if s.share > 0 else "", style=style)
        cells: list[str | Text] = [str(s.rank), s.name, _fmt(s.effect), f"{s.share:.0%}",
                 Text(s.verdict, style=style), bar]
        cells += [_fmt((s.groups or {})[g]) for g in group_names]
        table.add_row(*cells)
    buf = StringIO()
    console = Console(file=buf, force_terminal=bool(color), no_color=not color,
                      width=width or 100, highlight=False)
    console.print(table)
    return buf.getvalue()


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[ProgressFn | None]:
    """A progress callback drawing on stderr (a live bar on a terminal, lines elsewhere)."""
    if not enabled:
        yield None
        return
    console = stderr_console()
    if not console.is_terminal:
        def plain(what: str, done: int, total: int) -> None:
            if done < total:
                console.print(f"[{done + 1}/{total}] {what}", highlight=False, markup=False)
        yield plain
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("stages", total=None)

        def live(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        yield live

"""The progress bars and lines a run draws on stderr while it estimates.

With report.py, the only module that imports rich.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from acctattr.output.text import printable
from acctattr.results import Progress as ProgressFn


def stderr_console() -> Console:
    # stderr closed (2>&-): rich would fall back to stdout, into the result; draw nowhere
    return Console(file=sys.stderr if sys.stderr is not None else io.StringIO(),
                   highlight=False)


@contextmanager
def progress_bar(enabled: bool, force: bool = False) -> Iterator[ProgressFn | None]:
    """A progress callback drawing on stderr: on a terminal two live bars (the stages, and the
    work inside the current stage's estimate with its ETA); elsewhere nothing unless
    ``force`` (--progress), then plain lines. ``enabled`` False (-q): nothing at all.

    The callback takes (what, done, total, level=0): level 0 a stage, level 1 a step inside.
    """
    console = stderr_console()
    if not enabled or not (console.is_terminal or force):
        yield None
        return
    if not console.is_terminal:
        def plain(what: str, done: int, total: int, level: int = 0) -> None:
            if level == 0 and done < total:
                console.print(f"[{done + 1}/{total}] {printable(what)}", highlight=False,
                              markup=False)
            elif level == 1 and done == 0:  # one line per step of the estimate, not per substep
                console.print(f"    {printable(what)} ({total} substeps)", highlight=False,
                              markup=False)
        yield plain
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        stages = bar.add_task("stages", total=None)
        inside = bar.add_task("", total=None, visible=False)

        def live(what: str, done: int, total: int, level: int = 0) -> None:
            what = escape(printable(what))  # a rich description is markup
            if level == 0:
                bar.update(stages, description=what, completed=done, total=total)
                bar.update(inside, visible=False)
            elif done == 0:  # a new step of the estimate: its own bar and ETA
                bar.reset(inside, total=total, description=f"  {what}", visible=True)
            else:
                bar.update(inside, completed=done)

        yield live

"""The command line's error boundary and output: AcctattrError -> exit 2, Ctrl-C -> 130,
SIGTERM -> 143, a bug -> 3; results to stdout or a file (atomically), everything else to
stderr, by rank 0 alone under torchrun."""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from acctattr import signals
from acctattr.distributed import from_env, is_primary
from acctattr.errors import AcctattrError
from acctattr.output.atomic import write_atomic
from acctattr.output.text import printable

T = TypeVar("T")


def err(text: str) -> None:
    """A line on stderr; ranks other than 0 of a torchrun job say nothing."""
    if is_primary():
        _to_stderr(text)


def _to_stderr(text: str) -> None:
    # with stderr closed (2>&-) sys.stderr is None, and print(file=None) would write the
    # line to stdout, into the result (a warning before the JSON): it is dropped instead
    if sys.stderr is not None:
        print(printable(text, keep="\n"), file=sys.stderr)


def err_of(error: BaseException, text: str) -> None:
    """An error's message on stderr. Under torchrun, rank 0 says it (with the rank it came
    from); another rank only when rank 0 cannot have heard of it: an error of its own
    (not shared by acctattr.distributed) that is a bug or marked ``rank_local``."""
    rank = from_env()[0]
    source = getattr(error, "shared_from", None)
    if rank == 0:
        prefix = f"rank {source}: " if source else ""
    elif source is None and (getattr(error, "rank_local", False)
                             or not isinstance(error, AcctattrError)):
        prefix = f"rank {rank}: "
    else:
        return
    _to_stderr(prefix + text)


def guarded(fn: Callable[[], T]) -> T:
    """The error boundary: bad input -> exit 2 with a message, Ctrl-C -> 130, no traceback."""
    debug = bool(os.environ.get("ACCTATTR_DEBUG"))
    try:
        out = fn()
        signals.raise_if_received()  # a signal whose exception something swallowed
        return out
    except AcctattrError as e:
        if debug:
            traceback.print_exc()
        err_of(e, f"error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130) from None
    except signals.Terminated:
        err("terminated")
        raise typer.Exit(143) from None
    except typer.Exit:
        raise
    except BrokenPipeError:
        # the reader of stdout went away (``| head``, ``| true``): say so once
        _stdout_to_devnull()
        err("error: stdout was closed before the whole result was written (broken pipe)")
        raise typer.Exit(2) from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        err_of(e, f"internal error: {type(e).__name__}: {e}\n  this is a bug in acctattr; "
                "rerun with ACCTATTR_DEBUG=1 for the traceback and report it")
        raise typer.Exit(3) from None


def _stdout_to_devnull() -> None:
    """After a failed write to stdout: make sure Python's own flush at exit cannot fail on
    it again (a traceback-like 'Exception ignored' and exit 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _stdout_closed() -> AcctattrError:
    return AcctattrError("stdout is closed (started with >&-): there is nowhere to print "
                         "the result", "pass --output FILE, or leave stdout open")


def check_output(output: Path | None, option: str = "--output") -> None:
    """A result file that cannot be written fails before any computing (exit 2); so does a
    result for stdout when stdout is closed."""
    if output is None and sys.stdout is None and is_primary():
        raise _stdout_closed()
    if output is not None:
        from acctattr.output.atomic import check_target

        check_target(output, option)


def refuse_inputs(output: Path | None, inputs: list[Path], option: str = "--output",
                  root: Path | None = None, inside: bool = True) -> None:
    """An output that is one of the command's inputs, or (``inside``) lies inside an input
    folder (a checkpoint folder; not ``root``, the run's own folder, where results may go),
    is refused before computing (exit 2): acctattr never replaces or adds to what it
    reads."""
    if output is None:
        return
    out = output.resolve()
    for path in inputs:
        p = path.resolve()
        if out == p or (inside and p.is_dir() and p != root and p in out.parents):
            raise AcctattrError(f"{option} {output}: is {'inside ' if out != p else ''}"
                                f"{path}, one of the inputs; acctattr never writes over "
                                "or into what it reads",
                                "write it somewhere else, e.g. a new file beside the run "
                                "folder")


def manifest_inputs(manifest: Path) -> list[Path]:
    """The manifest and every file or folder it names (checkpoints, data, code), for
    refuse_inputs; only the manifest itself where it cannot be read (the command then
    reports why)."""
    import dataclasses

    from acctattr.runs.manifest import load_manifest

    try:
        doc = load_manifest(manifest)
    except AcctattrError:
        return [manifest]
    found: list[Path] = []

    def walk(node: object) -> None:
        if isinstance(node, Path):
            found.append(node)
        elif isinstance(node, (list, tuple)):
            for x in node:
                walk(x)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))

    walk(doc)
    return found


def use_color(output: Path | None) -> bool:
    """Colour for a terminal on stdout, unless NO_COLOR is set to something (no-color.org:
    an empty NO_COLOR does not turn colour off)."""
    return output is None and sys.stdout is not None and sys.stdout.isatty() \
        and not os.environ.get("NO_COLOR")


def terminal_width(output: Path | None) -> int | None:
    """The terminal's width when the table goes to one, else None (the table's own width)."""
    if output is None and sys.stdout is not None and sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def emit(text: str, output: Path | None) -> None:
    """The result to ``output`` (atomically) or to stdout; by rank 0 alone under torchrun."""
    if not is_primary():
        return
    if output is not None:
        write_atomic(output, text)
        err(f"wrote {output}")
    else:
        if sys.stdout is None:
            raise _stdout_closed()
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise  # the boundary (guarded) says so
        except OSError as e:  # /dev/full, a disk that filled, an I/O error
            _stdout_to_devnull()
            raise AcctattrError(f"cannot write the result to stdout ({e.strerror or e})",
                                "free space where stdout goes, or pass --output FILE") from e

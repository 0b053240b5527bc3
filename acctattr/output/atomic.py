"""Writing results atomically: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from acctattr import signals
from acctattr.errors import AcctattrError
from acctattr.files import path_problem
from acctattr.output.text import printable


@contextmanager
def atomic_file(path: Path, option: str, binary: bool = False) -> Iterator[IO]:
    """A file handle whose contents replace ``path`` atomically when the block ends.

    The data goes to ``.NAME.XXXX.tmp`` in the same folder, is fsynced, then renamed over
    ``path`` (atomic on POSIX). An exception, Ctrl-C or SIGTERM removes the temporary file;
    a SIGKILL (or power loss) between its creation and the rename cannot, and leaves it
    behind, while ``path`` itself is always the old file or the complete new one.

    A ``path`` that is a symlink is written through to its target, as editors do: the
    target file is replaced (atomically, in its own folder) and the link stays a link.

    Args:
        option: the command-line option that named ``path``, for messages (``--output``).
    """
    target = check_target(path, option)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise AcctattrError(f"{option} {path}: cannot write in {target.parent} "
                            f"({e.strerror or e})") from e
    signals.track(tmp)
    try:
        fh: IO = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result gets the usual mode
        signals.raise_if_received()  # an interrupted run never commits a result
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise AcctattrError(f"{option} {path}: cannot write ({e.strerror})") from e
        raise
    finally:
        signals.untrack(tmp)


def check_target(path: Path, option: str = "--output") -> Path:
    """Where writing ``path`` lands (a symlink's target), refused (exit 2) unless its folder
    exists and takes a new file and ``path`` is absent or a regular file. Called before
    any computing, so a run never ends in "cannot write"."""
    problem = path_problem(path, "file")
    if problem is not None and problem != "not found":
        said = f"is {problem}" if problem.startswith("a ") else problem  # "is a folder, ..."
        raise AcctattrError(f"{option} {printable(str(path))}: {said}",
                            "name a regular file (or a new one) in a folder you can write")
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path.absolute()
    folder = target.parent
    if path_problem(folder, "folder") is not None:
        raise AcctattrError(f"{option} {path}: folder {folder} does not exist"
                            + (f" (it is where the symlink {path} points)"
                               if target != path.absolute() else ""))
    try:  # the only test that holds for root, read-only mounts and ACLs alike
        fd, probe = tempfile.mkstemp(prefix=".acctattr-probe-", dir=folder)
        try:
            os.close(fd)
        finally:
            os.unlink(probe)
    except OSError as e:
        raise AcctattrError(f"{option} {path}: folder {folder} is not writable, cannot write "
                            f"in it ({e.strerror or e})",
                            "choose a folder you can write, or fix its permissions") from e
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str, option: str = "--output") -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_file(path, option) as fh:
        slow = _test_slow_write()
        if slow:  # test-only: stop halfway through, so a test can kill us mid-write
            fh.write(text[: len(text) // 2])
            fh.flush()
            time.sleep(slow)
            text = text[len(text) // 2:]
        fh.write(text)


def _test_slow_write() -> float:
    """Seconds to pause halfway through a write; from ACCTATTR_TEST_SLOW_WRITE, for tests only."""
    try:
        return max(0.0, float(os.environ.get("ACCTATTR_TEST_SLOW_WRITE", "0")))
    except ValueError:
        return 0.0

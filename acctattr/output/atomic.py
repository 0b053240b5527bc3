"""Writing results atomically: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from acctattr.errors import AcctattrError


@contextmanager
def atomic_file(path: Path, option: str, binary: bool = False) -> Iterator[IO]:
    """A file handle whose contents replace ``path`` atomically when the block ends.

    The data goes to ``.NAME.XXXX.tmp`` in the same folder, is fsynced, then renamed over
    ``path`` (atomic on POSIX). An exception or Ctrl-C removes the temporary file; a SIGKILL
    (or power loss) between its creation and the rename cannot, and leaves it behind, while
    ``path`` itself is always the old file or the complete new one.

    Args:
        option: the command-line option that named ``path``, for messages (``--output``).
    """
    folder = path.resolve().parent
    if not folder.is_dir():
        raise AcctattrError(f"{option} {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        fh: IO = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result gets the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise AcctattrError(f"{option} {path}: cannot write ({e.strerror})") from e
        raise


def check_target(path: Path, option: str) -> None:
    """Fail before any computing when ``path`` cannot be written: its folder missing, not a
    folder or not writable, or ``path`` itself a folder."""
    folder = path.resolve().parent
    if not folder.is_dir():
        raise AcctattrError(f"{option} {path}: folder {folder} does not exist",
                            "create it first, or name a file in an existing folder")
    if path.is_dir():
        raise AcctattrError(f"{option} {path}: is a folder", "name a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AcctattrError(f"{option} {path}: folder {folder} is not writable")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(folder, os.W_OK):
        raise AcctattrError(f"{option} {path}: is not writable")


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

"""What kind of thing a path names, checked before anything is opened.

Every path acctattr reads goes through ``check_file`` or ``check_folder`` first: a FIFO,
a character or block device or a socket would block a read forever (or never end), and a
symlink loop, an embedded NUL byte or a name the OS finds too long would otherwise surface
as an internal error. Each is refused with an AcctattrError (exit 2) naming the path and
the key it came from. Standard library only: the manifest parser (no torch) uses it too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from acctattr.errors import AcctattrError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_problem(path: str | Path, want: str = "any") -> str | None:
    """Why ``path`` cannot be read as ``want`` ("file", "folder" or "any": either), or None.

    Never opens the path and never raises: a missing path is "not found".
    """
    text = os.fspath(path)
    if "\x00" in text:
        return "the path holds a NUL byte"
    try:
        st = os.stat(text)  # follows symlinks: a loop shows here as ELOOP
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop (too many levels of symbolic links)"
        if e.errno == errno.ENAMETOOLONG:
            return "a file name or path too long for the operating system"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "not found"
        return f"cannot be accessed ({e.strerror or e})"
    except ValueError as e:  # what the OS layer raises for some malformed names
        return f"not a usable path ({e})"
    for test, name in _KINDS:
        if test(st.st_mode):
            return f"{name}, not a regular file or folder"
    if want == "file" and not stat.S_ISREG(st.st_mode):
        return "a folder, not a file" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    if want == "folder" and not stat.S_ISDIR(st.st_mode):
        return "a file, not a folder"
    return None


def check_file(path: str | Path, what: str = "",
               error: type[AcctattrError] = AcctattrError) -> Path:
    """``path`` as a Path when it is a regular file (after symlinks); else ``error``
    naming ``what`` (the key it came from, e.g. ``stage 'sft': optimizer.state``)."""
    return _check(path, "file", what, error)


def check_folder(path: str | Path, what: str = "",
                 error: type[AcctattrError] = AcctattrError) -> Path:
    """``path`` as a Path when it is a folder; else ``error``."""
    return _check(path, "folder", what, error)


def check_any(path: str | Path, what: str = "",
              error: type[AcctattrError] = AcctattrError) -> Path:
    """``path`` as a Path when it is a regular file or a folder; else ``error``."""
    return _check(path, "any", what, error)


def _check(path: str | Path, want: str, what: str, error: type[AcctattrError]) -> Path:
    problem = path_problem(path, want)
    if problem is not None:
        shown = os.fspath(path).replace("\x00", "\\0")
        raise error(f"{what + ' ' if what else ''}{shown}: {problem}")
    return Path(path)


def is_file(path: str | Path) -> bool:
    """A regular file (after symlinks)? False for anything else, never an exception."""
    return path_problem(path, "file") is None


def read_bytes_limited(path: Path, limit: int, what: str = "",
                       error: type[AcctattrError] = AcctattrError) -> bytes:
    """The whole of a regular file no larger than ``limit`` bytes (checked before reading)."""
    check_file(path, what, error)
    size = os.stat(path).st_size
    if size > limit:
        raise error(f"{what + ' ' if what else ''}{path}: {size:,} bytes, more than the "
                    f"{limit:,} this file may have")
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what + ' ' if what else ''}{path}: more than the {limit:,} bytes "
                    "this file may have")
    return data

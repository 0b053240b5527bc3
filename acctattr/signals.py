"""SIGINT and SIGTERM: exit 130 and 143, one line on stderr, no traceback, no temporary file.

Installed by the entry points (``acctattr``, ``python -m acctattr``) before anything else is
imported, so a signal in the first moments is handled as one later is. The first signal
raises KeyboardInterrupt (SIGINT) or Terminated (SIGTERM) in the main thread; the stack
unwinds, removing temporary files (output.atomic) and folders, and the CLI's error boundary
exits 130 or 143. A signal that arrives where Python swallows exceptions (a ``__del__``, a
weakref callback) would be lost, so the first signal also starts a timer: if the process is
still running after GRACE seconds, it removes the temporary files registered here and exits
with the same code at once; so does a signal that arrives during an import (an exception
raised there can cross a C++ extension's initialisation and abort the process). Further
signals are ignored while the first one unwinds.

Standard library only.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_CODES: dict[int, int] = {int(signal.SIGINT): 130, int(signal.SIGTERM): 143}
WORDS: dict[int, str] = {int(signal.SIGINT): "interrupted", int(signal.SIGTERM): "terminated"}
GRACE = 10.0  # seconds the normal unwinding may take before the exit is forced

_received: int | None = None
_temporary: set[str] = set()  # files to remove if the exit has to be forced


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that cleanup code runs (exit 143)."""

    exit_code = 143


def install() -> None:
    """Handle SIGINT and SIGTERM (a signal the parent set to be ignored stays ignored, as a
    shell's background job ignores SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _handle)


def _handle(signum: int, frame: object) -> None:
    global _received
    if _received is not None:
        return  # already unwinding: let it finish (the timer bounds it)
    _received = signum
    if _importing(frame):
        # an exception raised in a module being imported can cross an extension's C++
        # initialisation (torch's), which aborts the process ("terminate called ...",
        # SIGABRT) instead of unwinding: exit at once, as the timer would
        _force(signum)
    timer = threading.Timer(GRACE, _force, args=(signum,))
    timer.daemon = True
    timer.start()
    _raise(signum)


def _importing(frame: object) -> bool:
    """Whether the interrupted Python stack is inside an import."""
    while frame is not None:
        if getattr(getattr(frame, "f_code", None), "co_filename", "").startswith(
                "<frozen importlib"):
            return True
        frame = getattr(frame, "f_back", None)
    return False


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def _force(signum: int) -> None:
    for path in list(_temporary):
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        sys.stderr.write(WORDS.get(signum, "terminated") + "\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODES.get(signum, 143))


def exit_now(signum: int) -> None:
    """Exit with the signal's code once its exception has unwound the stack. Python's own
    shutdown is skipped: it could report a handled Ctrl-C as death by SIGINT (-2) instead
    of exit 130; everything acctattr cleans up has been cleaned up by then."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # AttributeError: closed, None
            pass
    os._exit(EXIT_CODES.get(signum, 143))


def say_and_exit() -> None:
    """After a signal's exception reached the top: its one line on stderr, then its code."""
    got = _received if _received is not None else int(signal.SIGINT)
    try:
        sys.stderr.write(WORDS.get(got, "interrupted") + "\n")
    except (OSError, ValueError, AttributeError):
        pass
    exit_now(got)


def received() -> int | None:
    """The signal received so far, if any."""
    return _received


def raise_if_received() -> None:
    """Raise the received signal's exception again (for one that was swallowed): called
    before a result is committed, so an interrupted run never writes one."""
    if _received is not None:
        _raise(_received)


def track(path: str) -> None:
    """A temporary file to remove if the exit has to be forced."""
    _temporary.add(path)


def untrack(path: str) -> None:
    _temporary.discard(path)

"""User strings made safe to print: no terminal escape sequences reach a terminal.

Stage names, group names, metric references and paths come from files acctattr did not
write. Printed raw, ``\\x1b]...`` or ``\\x1b[2J`` in a stage name would drive the reader's
terminal; a bidirectional override would reorder what they see. ``printable`` shows such
characters as visible escapes instead (``\\x1b``, ``\\u202e``).
"""

from __future__ import annotations

import re

# C0 and C1 controls (tab and newline handled by the caller's ``keep``), DEL, and the
# Unicode bidirectional overrides and isolates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, keep: str = "") -> str:
    """``text`` with every control or bidi character written as a visible escape, except
    those in ``keep`` (``"\\n"`` for a multi-line message)."""
    def esc(m: re.Match[str]) -> str:
        c = m.group()
        if c in keep:
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _UNSAFE.sub(esc, text)

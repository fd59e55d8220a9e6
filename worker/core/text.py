"""Text that crosses a trust boundary: refused when it carries control characters, escaped when
it is shown.

A producer's ``requested_by`` or an operator's ``--reason`` ends up on another person's terminal
(``pushctl events``, ``jobs show``): an ESC byte there could repaint the screen, and a NUL byte
cannot be stored by PostgreSQL at all. Entry points refuse them with ``refuse_control``; every
renderer for people passes free text through ``printable``.
"""

from __future__ import annotations

import re

from worker.core.errors import ValidationError

#: C0 controls, DEL and C1 controls (ESC, NUL, CSI ...); tab and newline included on purpose:
#: none of the fields this guards is multi-line.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def has_control(value: str) -> bool:
    """True when ``value`` holds a control character (ESC, NUL, newline, DEL, C1 ...)."""
    return CONTROL.search(value) is not None


def refuse_control(field: str, value: str) -> str:
    """``value`` unchanged, or a ``ValidationError`` naming the field (never echoing the value)."""
    found = CONTROL.search(value)
    if found is not None:
        raise ValidationError(
            f"{field} contains a control character (U+{ord(found.group()):04X} at position "
            f"{found.start()})",
            hint=f"give {field} as plain printable text, without escape sequences or NUL bytes",
        )
    return value


#: The same, but for text that is meant to span lines (a traceback): newline and tab stay.
CONTROL_EXCEPT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(value: object, *, keep_lines: bool = False) -> str:
    """``value`` as text with every control character shown as an escape (``\\x1b``), so it
    can be printed on a terminal without acting on it; ``keep_lines`` leaves newlines and tabs."""
    pattern = CONTROL_EXCEPT_LINES if keep_lines else CONTROL
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))

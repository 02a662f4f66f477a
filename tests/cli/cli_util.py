"""Helpers shared by the command-line tests."""

from __future__ import annotations


def one_error_line(err: str) -> bool:
    """True when stderr holds exactly one error line from ``interp`` and no traceback (progress bars of
    model loading may also be there)."""
    lines = [line for line in err.splitlines() if line.startswith("interp")]
    return "Traceback" not in err and len(lines) == 1 and ": error: " in lines[0]

"""Sizes in the words people read: one formatting for the API and the worker's messages."""

from __future__ import annotations

_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def size_human(size_bytes: int | None) -> str | None:
    """Binary units with decimal-looking names, as control panels show them: 12.4 GB."""
    if size_bytes is None:
        return None
    value = float(size_bytes)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

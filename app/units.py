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


def duration_human(seconds: float) -> str:
    """A duration in one or two units, for logs and the CLI: 45s, 3m 05s, 2h 10m, 3d 4h."""
    whole = max(0, int(seconds))
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"

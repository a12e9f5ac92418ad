"""Human units and plain-text tables: how pipekit reads and prints sizes, ages and rows."""

from __future__ import annotations

import re
from collections.abc import Sequence

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.I)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' (or plain seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration; use e.g. 7d, 12h, 30m, 45s")
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return float(match.group(1)) * units[match.group(2).lower()]


def parse_size(text: str) -> int:
    """'1GB', '500MB', '10k', '123' (bytes; units are powers of 1024) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a size; use e.g. 1GB, 500MB, 10k")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024**power)


def human_size(size: float) -> str:
    """`512 B`, `1.5 MB`: a byte count for people."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def age(seconds: float) -> str:
    """'3m', '2h', '5d': how long ago, for listings and reasons."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def table(rows: Sequence[Sequence[str]], indent: str = "  ", right: Sequence[int] = ()) -> str:
    """Rows as aligned columns (the first row is the header); `right` columns align right."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)

"""Stages for tests/test_retries.py: attempts logged to a file, chosen errors, a hang."""

from __future__ import annotations

import builtins
import time
from pathlib import Path


def attempts(log: str, fail_times: int, error: str = "ConnectionError") -> int:
    """Append this attempt's wall-clock time to `log`; raise `error` (a builtin exception
    class name) on the first `fail_times` attempts, then return the attempt number."""
    path = Path(log)
    with path.open("a") as stream:
        stream.write(f"{time.time()!r}\n")
    count = len(path.read_text().splitlines())
    if count <= fail_times:
        raise getattr(builtins, error)(f"attempt {count} failed")
    return count


def hang(seconds: float = 60.0) -> int:
    """A stage that does not return in time."""
    time.sleep(seconds)
    return 0


def branch(marker: str, value: int = 7) -> int:
    """An independent stage: leaves a marker file and returns `value`."""
    Path(marker).write_text(str(value))
    return value

"""Stages for the production tests (run lock, schedules): importable by `pipekit`
subprocesses, since `cli_env` puts tests/ on PYTHONPATH."""

from __future__ import annotations

import time
from pathlib import Path


def gate(directory: str, name: str, timeout: float = 90.0) -> str:
    """Write `<name>.started`, wait (bounded) for `<name>.release`, write `<name>.done`.

    Each file holds the `time.time()` it was written at, so a test can read the order.
    """
    folder = Path(directory)
    (folder / f"{name}.started").write_text(repr(time.time()))
    deadline = time.monotonic() + timeout
    while not (folder / f"{name}.release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: nobody released the gate within {timeout} s")
        time.sleep(0.05)
    (folder / f"{name}.done").write_text(repr(time.time()))
    return name

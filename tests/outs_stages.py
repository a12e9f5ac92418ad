"""Stages for tests/test_outs.py: they write and read files declared as `outs`."""

from __future__ import annotations

from pathlib import Path


def _log(log: str, name: str) -> None:
    with open(log, "a") as handle:
        handle.write(name + "\n")


def write(path: str, log: str, text: str = "hello", counter: str = "") -> str:
    """Write `text` to `path` (plus a run number kept in `counter`, outside the key, when
    given: a stage whose file differs on every run)."""
    _log(log, "write")
    if counter:
        number = int(Path(counter).read_text() or 0) + 1 if Path(counter).exists() else 1
        Path(counter).write_text(str(number))
        text = f"{text} {number}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return path


def read(path: str, log: str) -> str:
    _log(log, "read")
    return Path(path).read_text()


def half(path: str, log: str, flag: str) -> str:
    """Writes half the file, then raises while `flag` exists; else the whole file."""
    _log(log, "half")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("hal")
    if Path(flag).exists():
        raise RuntimeError("crashed after writing half the file")
    Path(path).write_text("whole")
    return path


def source(path: str, log: str) -> str:
    """Reads an outside file (not in the key): the kind of stage that must always run."""
    _log(log, "source")
    return Path(path).read_text()


def use(text: str, log: str) -> str:
    _log(log, "use")
    return text.upper()

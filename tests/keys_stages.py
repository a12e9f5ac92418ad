"""Stages whose output keys are declared (or not) for `foreach: {keys_of: ...}` tests
(tests/test_matrix.py): TypedDict and dataclass return annotations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict


class Regions(TypedDict):
    eu: int
    us: int
    apac: int


def split(total: int = 60, log: str = "") -> Regions:
    """Splits `total` into three declared parts (and logs a call to `log` when given)."""
    if log:
        with open(log, "a") as handle:
            handle.write("split\n")
    return {"eu": total // 2, "us": total // 3, "apac": total // 6}


@dataclass
class Halves:
    train: list
    test: list


def halves(n: int = 4) -> Halves:
    rows = list(range(n))
    return Halves(rows[: n // 2], rows[n // 2 :])


def fit(item: str, part, scale: float = 1.0, log: str = "") -> dict:
    """One member: names its key and scales its part of the upstream output."""
    if log:
        with open(log, "a") as handle:
            handle.write(f"fit {item}\n")
    size = part * scale if isinstance(part, int | float) else len(part)
    return {"region": item, "size": size}


def untyped() -> dict:
    return {"eu": 1}


class Nothing(TypedDict):
    pass


def nothing() -> Nothing:
    return {}


class Partial(TypedDict, total=False):
    eu: int
    us: int


def partial() -> Partial:
    return {"eu": 1}


Odd = TypedDict("Odd", {"a=b": int})


def odd() -> Odd:
    return {"a=b": 1}


class Maker:
    """A class target: an instance of itself, no declared keys."""


def broken_path() -> Path:  # not a mapping type
    return Path(".")


def liar() -> Regions:
    """Declares three keys, returns two: the member of the missing one fails."""
    return {"eu": 1, "us": 2}  # type: ignore[typeddict-item]

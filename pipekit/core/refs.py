"""Edge sources: `Ref` is what an input's text (`split.train`, `train[*]`) parses into.

Its own module so that `spec` (which parses refs) and `matrix` (which resolves refs to
matrix members) share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ref:
    """An edge source: the output of `stage`, or `output[key]` when `key` is set."""

    stage: str
    key: str | None = None
    #: a fan-in over matrix members (core/matrix.py): their names, and "dict" or "list"
    members: tuple[str, ...] = ()
    form: str = ""

    @classmethod
    def parse(cls, text: str) -> Ref:
        if "]" in text:  # a matrix member or fan-in: dots may sit inside the brackets
            close = text.index("]") + 1
            rest = text[close:]
            if not rest or rest.startswith("."):
                return cls(text[:close], rest[1:] or None)
        stage, _, key = text.partition(".")
        return cls(stage, key or None)

    @property
    def sources(self) -> tuple[str, ...]:
        """The stages this edge reads: the matrix members of a fan-in, else `stage`."""
        return self.members or (self.stage,)

    def __str__(self) -> str:
        return f"{self.stage}.{self.key}" if self.key else self.stage

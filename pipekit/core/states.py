"""The stage lifecycle vocabulary: `pending -> running -> done | cached | failed | skipped`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

State = Literal["pending", "running", "done", "cached", "failed", "skipped"]
STATES: tuple[State, ...] = ("pending", "running", "done", "cached", "failed", "skipped")
FINAL_STATES = frozenset({"done", "cached", "failed", "skipped"})


def count_states(states: Iterable[str]) -> str:
    """`2 done, 1 failed`: how many stages are in each state, in lifecycle order."""
    counts = dict.fromkeys(STATES, 0)
    for state in states:
        counts[state] = counts.get(state, 0) + 1  # type: ignore[index]
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)

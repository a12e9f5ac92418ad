"""Which values of a stage output count as metrics: numeric scalars of a dict output."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any


def numeric_items(output: Any, keys: Iterable[str] | None = None) -> dict[str, float]:
    """Finite numeric scalars of a mapping output (only `keys` when given), as floats.

    Booleans are excluded; NumPy scalars count (they register as `numbers.Number`).
    """
    if not isinstance(output, Mapping):
        return {}
    wanted = output.keys() if keys is None else keys
    found = {}
    for key in wanted:
        value = output.get(key)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if math.isfinite(value):
                found[str(key)] = value
    return found

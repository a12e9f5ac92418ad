"""The `schedule` key: a cron expression checked here, so a typo fails at `validate`
rather than when a scheduler first reads it.

Only what both cron and Airflow accept passes: five fields (minute hour day-of-month
month day-of-week) of `*`, numbers, names (`jan`, `mon`), ranges, lists and `*/n` or
`a-b/n` steps, or the presets @hourly, @daily, @weekly, @monthly, @yearly.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import ConfigTypeError, ScheduleError, where

if TYPE_CHECKING:
    from ..core.spec import PipelineSpec

#: (name, lowest, highest, names for the values) of the five cron fields, in order.
FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    (
        "month",
        1,
        12,
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    ),
    ("day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
#: Presets that cron and Airflow both understand.
PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly")
EXAMPLE = "schedule='*/5 * * * *' (every 5 minutes)"

_ITEM = re.compile(r"^(?P<range>\*|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>[0-9]+))?$")


def check_schedule(spec: PipelineSpec) -> str | None:
    """The pipeline's `schedule` (None when it has none), or ScheduleError naming it."""
    value = spec.config.get("schedule")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigTypeError(
            f"{where(spec.name, key='schedule')} must be a cron string such as '*/5 * * * *', "
            f"got {type(value).__name__} {value!r}; quote it in YAML"
        )
    try:
        cron_fields(value)
    except ValueError as exc:
        raise ScheduleError(
            f"{where(spec.name, key='schedule')} '{value}' {exc}; write it as cron's five "
            f"fields (minute hour day-of-month month day-of-week) or one of "
            f"{', '.join(PRESETS)}, e.g. {EXAMPLE}"
        ) from None
    return value


def cron_fields(text: str) -> list[str]:
    """The five fields of a cron expression (a preset stays one item); ValueError says
    what is wrong, as a phrase that follows the expression."""
    text = text.strip()
    if text.startswith("@"):
        if text.lower() not in PRESETS:
            raise ValueError("is not a preset both cron and Airflow know")
        return [text.lower()]
    fields = text.split()
    if len(fields) != len(FIELDS):
        raise ValueError(f"has {len(fields)} field{'s' * (len(fields) != 1)}, not 5")
    for field, (name, low, high, names) in zip(fields, FIELDS, strict=True):
        for item in field.split(","):
            _check_item(item, name, low, high, names)
    return fields


def _check_item(item: str, name: str, low: int, high: int, names: tuple[str, ...]) -> None:
    match = _ITEM.match(item)
    if not match:
        raise ValueError(f"has {name} '{item}', which is not *, a number, a range or a step")
    span, step = match.group("range"), match.group("step")
    if step is not None and int(step) == 0:
        raise ValueError(f"has {name} step 0 in '{item}'")
    if step is not None and span != "*" and "-" not in span:
        raise ValueError(f"has {name} '{item}': a step needs * or a range (e.g. */{step})")
    if span == "*":
        return
    ends = [_value(part, name, low, high, names) for part in span.split("-")]
    if len(ends) == 2 and ends[0] > ends[1]:
        raise ValueError(f"has {name} range '{span}' that runs backwards")


def _value(part: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    if part.isdigit():
        number = int(part)
        if not low <= number <= high:
            raise ValueError(f"has {name} {number}, outside {low}-{high}")
        return number
    if part.lower() in names:
        return names.index(part.lower()) + low
    choices = f" or {names[0]}-{names[-1]}" if names else ""
    raise ValueError(f"has {name} '{part}', not a number {low}-{high}{choices}")

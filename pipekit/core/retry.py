"""A stage's retry and timeout settings, and the pipeline-wide `stage_defaults:` for them.

`retries`, `retry_delay` (a duration: `5s`, or seconds), `retry_backoff` (a factor >= 1:
attempt n+1 waits `retry_delay * retry_backoff ** (n - 1)`), `retry_on` (exception
classes worth retrying; others fail at once) and `timeout` (a duration per attempt). A
stage's own value wins over `stage_defaults`; errors name the key as an override would.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigTypeError, RetryOnError, UnknownKeyError, did_you_mean, where
from .text import parse_duration

#: Keys of `stage_defaults:` (and of a stage) that this module parses, with their meaning.
RETRY_KEYS = {
    "retries": "how many times to re-run a failing stage (default 0)",
    "retry_delay": "wait before a retry, a duration such as 5s (default 0)",
    "retry_backoff": "factor >= 1 the delay grows by per retry: delay * backoff^(n-1)",
    "retry_on": "exception classes to retry, e.g. [ConnectionError, requests.Timeout]",
    "timeout": "longest time one attempt may run, a duration such as 30m (default none)",
}

_DEFAULTS: dict[str, Any] = {
    "retries": 0,
    "retry_delay": 0.0,
    "retry_backoff": 1.0,
    "retry_on": (),
    "timeout": None,
}


def parse_defaults(pipeline: str, raw: Any) -> dict[str, Any]:
    """The `stage_defaults:` section as parsed settings (only the keys it sets)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigTypeError(
            f"{where(pipeline, key='stage_defaults')} must be a mapping of "
            f"{', '.join(RETRY_KEYS)}, got {type(raw).__name__} {raw!r}"
        )
    for key in raw:
        if key not in RETRY_KEYS:
            raise UnknownKeyError(
                f"{where(pipeline, key='stage_defaults')}: unknown key 'stage_defaults.{key}'"
                f"{did_you_mean(str(key), RETRY_KEYS)}; stage_defaults may set "
                f"{', '.join(RETRY_KEYS)}"
            )
    return {
        key: _parse(pipeline, None, key, raw[key]) for key in RETRY_KEYS if raw.get(key) is not None
    }


def parse_settings(
    pipeline: str, stage: str, raw: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """A stage's retry/timeout fields: its own value, else the default, else pipekit's."""
    out = dict(_DEFAULTS)
    out.update(defaults)
    for key in RETRY_KEYS:
        if raw.get(key) is not None:
            out[key] = _parse(pipeline, stage, key, raw[key])
    return out


def _parse(pipeline: str, stage: str | None, key: str, value: Any) -> Any:
    """One setting of `stages.<stage>` (or of `stage_defaults` when `stage` is None)."""
    path = f"stages.{stage}.{key}" if stage else f"stage_defaults.{key}"
    place = where(pipeline, stage, key) if stage else where(pipeline, key=path)
    if key == "retries":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigTypeError(f"{place} must be an integer >= 0, got {value!r}; e.g. {path}=3")
        return value
    if key in ("retry_delay", "timeout"):
        seconds = _seconds(value)
        if seconds is None or seconds < 0 or (key == "timeout" and seconds == 0):
            kind = "a positive" if key == "timeout" else "a"
            raise ConfigTypeError(
                f"{place} must be {kind} duration such as 30s, 5m, 2h (or seconds), "
                f"got {value!r}; e.g. {path}={'30m' if key == 'timeout' else '5s'}"
            )
        return seconds
    if key == "retry_backoff":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
            raise ConfigTypeError(
                f"{place} must be a number >= 1 (the factor the delay grows by per retry), "
                f"got {value!r}; e.g. {path}=2"
            )
        return float(value)
    if isinstance(value, str):  # retry_on: one class is fine too
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigTypeError(
            f"{place} must be a list of exception class names, e.g. "
            f"[ConnectionError, requests.exceptions.Timeout], got {value!r}"
        )
    for item in value:
        exception_class(pipeline, place, item)  # checked now, not at the first failure
    return tuple(value)


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value.strip())
        except ValueError:
            return None
    return None


def exception_class(pipeline: str, place: str, name: str) -> type[BaseException]:
    """`ConnectionError` (a builtin) or `requests.exceptions.Timeout` (dotted) as a class
    (`place`: where errors say the name was given)."""
    if "." not in name:
        found = getattr(builtins, name, None)
        if found is None:
            known = [n for n, v in vars(builtins).items() if _is_exception(v)]
            raise RetryOnError(
                f"{place}: '{name}' is not a builtin exception{did_you_mean(name, known)}; "
                f"name other classes with their module, e.g. requests.exceptions.Timeout"
            )
    else:
        import importlib

        module, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise RetryOnError(
                f"{place}: '{name}' cannot be imported ({type(exc).__name__}: {exc}); "
                f"give the class's full dotted path, e.g. requests.exceptions.Timeout"
            ) from None
    if not _is_exception(found):
        raise RetryOnError(
            f"{place}: '{name}' is not an exception class (a subclass of Exception), "
            f"got {type(found).__name__}"
        )
    return found


def _is_exception(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, Exception)


def exception_classes(pipeline: str, stage: str, names: tuple[str, ...]) -> tuple[type, ...]:
    """The classes of a stage's `retry_on` (validated when the spec was parsed)."""
    place = where(pipeline, stage, "retry_on")
    return tuple(exception_class(pipeline, place, n) for n in names)

"""What a stage's callable declares without being called: the object a `_target_` path
names, and the keys its return annotation promises (a TypedDict's keys, a dataclass's
fields).

Its own module, below `spec`, `matrix` and `targets`: `matrix` expands
`foreach: {keys_of: split}` from split's declared keys while the config is parsed (before
the graph exists), and `targets` checks `split.key` inputs against the same keys.
Annotations that do not resolve are unknown (`UNKNOWN`), never guessed at.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import typing
from collections.abc import Callable
from functools import lru_cache
from typing import Any

#: An annotation that is missing or does not resolve here.
UNKNOWN = object()


def import_target(path: str) -> Any:
    """Import `pkg.module.attr.subattr`; raise ImportError/AttributeError with the cause."""
    return _import(path)


@lru_cache(maxsize=4096)
def _import(path: str) -> Any:
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # only keep searching if the missing module is the one we tried (not a dependency)
            if exc.name and not module_name.startswith(exc.name):
                raise
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    return importlib.import_module(path)


def namespace(func: Callable[..., Any]) -> dict[str, Any] | None:
    """The globals string annotations of `func` are evaluated in (as typing does)."""
    unwrapped = inspect.unwrap(func) if callable(func) else func
    found = getattr(unwrapped, "__globals__", None)
    if found is None:
        module = sys.modules.get(getattr(func, "__module__", None) or "")
        found = vars(module) if module is not None else None
    return found


def resolve_annotation(annotation: Any, globals_: dict[str, Any] | None) -> Any:
    """The annotation as an object (a string one evaluated in `globals_`), or UNKNOWN."""
    if annotation is inspect.Parameter.empty or annotation is inspect.Signature.empty:
        return UNKNOWN
    if isinstance(annotation, str):
        if globals_ is None:
            return UNKNOWN
        try:
            return eval(annotation, dict(globals_))  # what typing.get_type_hints does
        except Exception:  # a name imported only under TYPE_CHECKING, a typo: never guess
            return UNKNOWN
    return annotation


@lru_cache(maxsize=4096)
def returned_type(func: Callable[..., Any]) -> type | None:
    """The TypedDict or dataclass a function's return annotation names, else None."""
    if not (inspect.isfunction(inspect.unwrap(func)) or inspect.ismethod(func)):
        return None  # a class returns an instance of itself: not a declared mapping
    try:
        annotation = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return None
    resolved = resolve_annotation(annotation, namespace(func))
    if not isinstance(resolved, type):
        return None
    if typing.is_typeddict(resolved) or dataclasses.is_dataclass(resolved):
        return resolved
    return None


def type_keys(declared: type) -> tuple[str, ...]:
    """A TypedDict's keys or a dataclass's fields, in declaration order."""
    if dataclasses.is_dataclass(declared):
        return tuple(f.name for f in dataclasses.fields(declared))
    return tuple(getattr(declared, "__annotations__", {}))


def returned_keys(func: Callable[..., Any]) -> tuple[str, tuple[str, ...]] | None:
    """(type name, keys) when a function's return annotation is a TypedDict or a dataclass."""
    declared = returned_type(func)
    if declared is None:
        return None
    return declared.__name__, type_keys(declared)


def optional_keys(declared: type) -> tuple[str, ...]:
    """Keys a TypedDict may leave out (`total=False`, `NotRequired[...]`); () otherwise."""
    optional = getattr(declared, "__optional_keys__", frozenset())
    return tuple(key for key in type_keys(declared) if key in optional)

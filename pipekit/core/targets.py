"""Resolving `_target_` paths to callables and checking stages against their signatures."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ..errors import (
    MissingArgumentError,
    TargetImportError,
    TargetNotCallableError,
    UnknownArgumentError,
    did_you_mean,
    where,
)
from .spec import PipelineSpec, Stage


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


def resolve(pipeline: str, stage: Stage) -> Callable[..., Any]:
    """The stage's callable, or a TargetImportError/TargetNotCallableError saying why."""
    try:
        func = import_target(stage.target)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TargetImportError(
            f"{where(pipeline, stage.name, '_target_')} '{stage.target}' cannot be imported "
            f"({type(exc).__name__}: {exc}); check the dotted path and that its package is "
            f"installed or on PYTHONPATH"
        ) from exc
    except Exception as exc:  # the module raised while importing
        raise TargetImportError(
            f"{where(pipeline, stage.name, '_target_')} '{stage.target}': importing it raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not callable(func):
        raise TargetNotCallableError(
            f"{where(pipeline, stage.name, '_target_')} '{stage.target}' is a "
            f"{type(func).__name__}, not a callable; point it at a function or class"
        )
    return func


@lru_cache(maxsize=4096)
def _signature(func: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str], bool] | None:
    """(accepted keyword names, required names, takes **kwargs) or None if unknowable."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    accepted, required, var_kw = set(), set(), False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            accepted.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
    return frozenset(accepted), frozenset(required), var_kw


def check_signature(pipeline: str, stage: Stage, func: Callable[..., Any]) -> None:
    """Every input/param must be accepted and every required argument supplied."""
    try:
        sig = _signature(func)
    except TypeError:  # unhashable callable object
        sig = None
    if sig is None:
        return
    accepted, required, var_kw = sig
    given = list(stage.inputs) + list(stage.params)
    if not var_kw:
        for name in given:
            if name not in accepted:
                kind = "input" if name in stage.inputs else "param"
                raise UnknownArgumentError(
                    f"{where(pipeline, stage.name, f'{kind} {name!r}')} is not an argument of "
                    f"{stage.target}{did_you_mean(name, accepted)}; it accepts "
                    f"{', '.join(sorted(accepted)) or 'no keyword arguments'}"
                )
    missing = sorted(required.difference(given))
    if missing:
        raise MissingArgumentError(
            f"{where(pipeline, stage.name)}: required argument '{missing[0]}' of "
            f"{stage.target} is not supplied; add it under 'params' or 'inputs'"
        )


def resolve_all(spec: PipelineSpec) -> dict[str, Callable[..., Any]]:
    """Resolve and signature-check every stage; the callables by stage name."""
    funcs = {}
    for stage in spec.stages.values():
        func = resolve(spec.name, stage)
        check_signature(spec.name, stage, func)
        funcs[stage.name] = func
    return funcs

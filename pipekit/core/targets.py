"""Resolving `_target_` paths to callables and checking stages against their signatures:
argument names, param values against simple annotations, and input keys against an
upstream's declared return type (TypedDict, dataclass). Annotations that do not resolve
or are not simple are skipped, never guessed at."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from ..errors import (
    MissingArgumentError,
    ParamTypeError,
    TargetImportError,
    TargetNotCallableError,
    UnknownArgumentError,
    UnknownOutputKeyError,
    did_you_mean,
    where,
)
from .declared import UNKNOWN as _UNKNOWN
from .declared import import_target
from .declared import namespace as _namespace
from .declared import resolve_annotation as _resolve_annotation
from .declared import returned_keys as _returned_keys
from .spec import PipelineSpec, Stage


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
    except SystemExit as exc:  # sys.exit() in module code: not the end of *our* process
        raise TargetImportError(
            f"{where(pipeline, stage.name, '_target_')} '{stage.target}': importing it called "
            f"sys.exit({exc.code!r}); guard the module's script code with "
            f'`if __name__ == "__main__":`'
        ) from exc
    except Exception as exc:  # the module raised while importing (KeyboardInterrupt passes)
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
    check_param_types(pipeline, stage, func)


# --- params against annotations ------------------------------------------------------------

#: Types a resolved config value can have; other values (Path, Enum) are never judged.
_PLAIN = (type(None), bool, int, float, str, list, dict)
#: The plain types each simple annotation accepts: an int is a float, a bool is no number.
_SIMPLE: dict[Any, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
    list: (list,),
    dict: (dict,),
}


@lru_cache(maxsize=4096)
def _param_types(func: Callable[..., Any]) -> dict[str, tuple[Any, str, bool]]:
    """Parameter -> (resolved annotation, its text, default is None) for the annotations
    that resolve; an annotation naming what cannot be imported here is left out."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return {}
    namespace = _namespace(func)
    found = {}
    for p in params:
        resolved = _resolve_annotation(p.annotation, namespace)
        if resolved is not _UNKNOWN:
            text = p.annotation if isinstance(p.annotation, str) else _text(p.annotation)
            found[p.name] = (resolved, text, p.default is None)
    return found


def _text(annotation: Any) -> str:
    return inspect.formatannotation(annotation)


def fits(annotation: Any, value: Any) -> bool | None:
    """Whether `value` fits a simple annotation: True, False, or None when it cannot say
    (a class, a generic, Any). int fits float; bool fits neither int nor float."""
    if type(value) not in _PLAIN:
        return None
    if annotation is None or annotation is type(None):
        return value is None
    try:
        accepted = _SIMPLE.get(annotation)
    except TypeError:  # an unhashable annotation object, e.g. `x: [int]`
        return None
    if accepted is not None:
        return type(value) in accepted
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return fits(args[0], value)
    if origin is typing.Literal:
        if any(type(choice) not in _PLAIN for choice in args):
            return None  # Literal[Color.RED]: the stage may convert a name; do not judge
        return any(type(value) is type(choice) and value == choice for choice in args)
    if origin in (typing.Union, types.UnionType):
        verdicts = [fits(arg, value) for arg in args]
        if True in verdicts:
            return True
        return None if None in verdicts else False
    if origin in (list, dict):  # list[int], dict[str, float]: the container, not the items
        return fits(origin, value)
    return None


def check_param_types(pipeline: str, stage: Stage, func: Callable[..., Any]) -> None:
    """Each param must fit its argument's annotation where that is simple and resolvable."""
    if not stage.params:
        return
    try:
        declared = _param_types(func)
    except TypeError:  # unhashable callable object
        declared = {}
    for name, value in stage.params.items():
        if name not in declared:
            continue
        annotation, text, none_default = declared[name]
        if value is None and none_default:
            continue  # `x: int = None`: null asks for the default
        if fits(annotation, value) is not False:
            continue
        key = f"stages.{stage.name}.params.{name}"
        hint = ""
        if typing.get_origin(annotation) is typing.Literal and isinstance(value, str):
            hint = did_you_mean(value, [str(a) for a in typing.get_args(annotation)])
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"
        raise ParamTypeError(
            f"{where(pipeline, key=key)} must be {text} (the annotation of '{name}' in "
            f"{stage.target}), got {shown}{hint}; fix the value (`{key}=...`) or the annotation"
        )


# --- input keys against declared return types ----------------------------------------------


def check_output_keys(
    spec: PipelineSpec, stage: Stage, funcs: Mapping[str, Callable[..., Any]]
) -> None:
    """Each input `upstream.key` must name a key upstream's declared return type has."""
    for arg, ref in stage.inputs.items():
        upstream = funcs.get(ref.stage)
        if ref.key is None or upstream is None:
            continue
        try:
            declared = _returned_keys(upstream)
        except TypeError:  # unhashable callable object
            declared = None
        if declared is None:
            continue
        type_name, keys = declared
        if ref.key not in keys:
            raise UnknownOutputKeyError(
                f"{where(spec.name, stage.name, f'input {arg!r}')} wants '{ref}' but "
                f"{ref.stage} returns {type_name} with keys {', '.join(keys) or '(none)'}"
                f"{did_you_mean(ref.key, keys)}; use one of its keys or change the "
                f"return annotation of {spec.stages[ref.stage].target}"
            )


def resolve_all(spec: PipelineSpec) -> dict[str, Callable[..., Any]]:
    """Resolve and signature-check every stage, then the keys inputs take from upstream
    outputs whose type declares them; the callables by stage name."""
    funcs = {}
    for stage in spec.stages.values():
        func = resolve(spec.name, stage)
        check_signature(spec.name, stage, func)
        funcs[stage.name] = func
    for stage in spec.stages.values():
        if stage.inputs:
            check_output_keys(spec, stage, funcs)
    return funcs

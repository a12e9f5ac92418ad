"""Typed, immutable spec of a pipeline and its stages, parsed once from the composed config.

Parsing checks shapes and names only (types, unknown keys, identifiers, duplicate
arguments); the graph and the callables are checked in `graph.py` and `targets.py`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import (
    ConfigTypeError,
    DuplicateArgumentError,
    EmptyPipelineError,
    PromotionConfigError,
    StageNameError,
    UnknownKeyError,
    check_keys,
    did_you_mean,
    where,
)
from .refs import Ref
from .retry import parse_defaults, parse_settings

#: Keys a stage may have, with a one-line meaning (used in errors and the docs).
STAGE_KEYS = {
    "_target_": "importable callable that computes the stage",
    "params": "mapping of literal keyword arguments",
    "inputs": "mapping argument -> 'stage' or 'stage.key' (the edges)",
    "after": "list of stages that must finish first (order-only edges)",
    "retries": "how many times to re-run a failing stage",
    "retry_delay": "wait before a retry, a duration such as 5s",
    "retry_backoff": "factor >= 1 the retry delay grows by: delay * backoff^(attempt-1)",
    "retry_on": "exception classes to retry (others fail at once), e.g. [ConnectionError]",
    "timeout": "longest time one attempt may run, a duration such as 30m",
    "model": "true when the output is a fitted model (logged and registered)",
    "metrics": "keys of the dict output to log as metrics",
    "cache": "false to always recompute this stage, or {ttl: 5m} to recompute after a time",
    "watch": "files or globs whose content the stage depends on (cache key)",
    "outs": "files or directories the stage writes (hashed with its cache entry)",
    "promote": "alias set on the model versions at or upstream of this stage when it passes; "
    "or {alias, metric: stage.key, mode: max|min}: only when the new version beats the holder",
    "description": "free text shown in drawings and docs",
    "resources": "abstract worker resources the stage needs, e.g. {GPU: 1} (executor=distributed)",
    "matrix": "mapping param -> list of values: one member per combination (core/matrix.py)",
    "foreach": "list of values: one member per value, passed as the param 'item'; or "
    "{keys_of: stage}: one member per key that stage's output is declared to have",
    "members": "list of {where: {axis: value}, params: {...}}: params for matching members",
}

#: Top-level keys of a composed config that pipekit reads or tolerates.
TOP_LEVEL_KEYS = {
    "name",
    "description",
    "stages",
    "executor",
    "tracking",
    "cache",
    "serve",
    "vars",
    "seed",
    "hydra",
    "sweep",  # sweep.metric / sweep.mode: how `pipekit run -m` ranks jobs (pipekit/sweep.py)
    "schedule",  # cron expression for schedulers (`pipekit export airflow`, docs/production.md)
    "concurrency",  # wait | skip: what a run does while another run holds the run lock
    "stage_defaults",  # retries, retry_delay, ... for every stage (core/retry.py)
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INTERPOLATION = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Stage:
    """One node of the pipeline: a callable, its literal params and its edges."""

    name: str
    target: str
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Ref] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    retries: int = 0
    #: seconds before the first retry; later retries wait `retry_delay * retry_backoff**n`
    retry_delay: float = 0.0
    retry_backoff: float = 1.0
    #: exception class names worth a retry (empty: any exception); core/retry.py
    retry_on: tuple[str, ...] = ()
    #: seconds one attempt may run (None: no limit)
    timeout: float | None = None
    model: bool = False
    metrics: tuple[str, ...] = ()
    cache: bool = True
    watch: tuple[str, ...] = ()
    #: files/directories the stage writes (`outs:`), relative to the run's start directory
    outs: tuple[str, ...] = ()
    #: `cache: {ttl: 5m}`: seconds after which the stored output expires (the stage re-runs)
    ttl: float | None = None
    #: `promote`: the alias, and with `{alias, metric, mode}` the metric (`stage.key`) the
    #: new version must beat the alias holder on (`tracking/promotion.py`), and its direction
    promote: str | None = None
    promote_metric: str | None = None
    promote_mode: str = "max"
    description: str = ""
    #: worker resources (executor=distributed), e.g. {"GPU": 1}
    resources: Mapping[str, float] = field(default_factory=dict)
    #: a matrix member's values, e.g. {"region": "eu"} (empty for other stages)
    matrix: Mapping[str, Any] = field(default_factory=dict)

    @property
    def upstream(self) -> tuple[str, ...]:
        """Stages this one waits for, inputs first, without duplicates, in declared order."""
        if not self.after:  # the common cases first: read for every stage of 100k
            if not self.inputs:
                return ()
            if len(self.inputs) == 1:
                return next(iter(self.inputs.values())).sources  # members are distinct
        seen = dict.fromkeys(dep for ref in self.inputs.values() for dep in ref.sources)
        seen.update(dict.fromkeys(self.after))
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """A parsed pipeline: its name, stages in declaration order, and the plain config."""

    name: str
    stages: Mapping[str, Stage]
    config: Mapping[str, Any]
    #: matrix stages: declared name -> member names (core/matrix.py)
    matrices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def section(self, key: str) -> dict[str, Any]:
        """A top-level config section (`executor`, `tracking`, `cache`, ...) or {}."""
        value = self.config.get(key)
        return dict(value) if isinstance(value, Mapping) else {}


def parse_pipeline(
    config: Mapping[str, Any], *, interpolated: frozenset[str] = frozenset()
) -> PipelineSpec:
    """Parse a plain (already resolved) config mapping into a PipelineSpec.

    `interpolated` names top-level keys used by `${...}` interpolations: they are user
    variables, not typos.
    """
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigTypeError(
            "config: 'name' must be a non-empty string naming the pipeline; "
            "select a pipeline with `pipeline=<name>` or set `name:` in your config"
        )
    for key in config:
        if key not in TOP_LEVEL_KEYS and key not in interpolated:
            raise UnknownKeyError(
                f"{where(name)}: unknown top-level key '{key}'"
                f"{did_you_mean(key, TOP_LEVEL_KEYS)}; known keys are "
                f"{', '.join(sorted(TOP_LEVEL_KEYS))} (put your own variables under 'vars:')"
            )
    stages = config.get("stages")
    if stages is None or (isinstance(stages, Mapping) and not stages):
        raise EmptyPipelineError(
            f"{where(name)}: no stages; declare them under 'stages:' as name: {{_target_: ...}}"
        )
    if not isinstance(stages, Mapping):
        raise ConfigTypeError(
            f"{where(name)}: 'stages' must be a mapping of stage name -> stage, "
            f"got {type(stages).__name__}"
        )
    defaults = parse_defaults(name, config.get("stage_defaults"))
    parsed = {str(k): _parse_stage(name, str(k), v, defaults) for k, v in stages.items()}
    matrices: dict[str, tuple[str, ...]] = {}
    from .matrix import expand, has_matrix  # members expand after composition: no YAML

    if has_matrix(stages):
        parsed, matrices = expand(name, parsed, stages)
    return PipelineSpec(
        name=name, stages=MappingProxyType(parsed), config=config, matrices=matrices
    )


def _parse_stage(
    pipeline: str, name: str, raw: Any, defaults: Mapping[str, Any] | None = None
) -> Stage:
    if not _IDENTIFIER.match(name):
        raise StageNameError(
            f"{where(pipeline, name)}: stage names must be Python identifiers "
            f"(letters, digits, '_'; not starting with a digit); rename it, e.g. "
            f"'{re.sub(r'[^A-Za-z0-9_]', '_', name).lstrip('0123456789') or 'stage'}'"
        )
    if not isinstance(raw, Mapping):
        raise ConfigTypeError(
            f"{where(pipeline, name)}: must be a mapping with a '_target_', "
            f"got {type(raw).__name__} {raw!r}"
        )
    check_keys(raw, STAGE_KEYS, UnknownKeyError, where(pipeline, name))
    target = raw.get("_target_")
    if not isinstance(target, str) or not target:
        raise ConfigTypeError(
            f"{where(pipeline, name)}: missing '_target_'; set it to the dotted path of "
            f"the callable that computes the stage, e.g. _target_: mypkg.steps.train"
        )

    def typed(key: str, kind: type | tuple[type, ...], hint: str, default: Any) -> Any:
        value = raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigTypeError(
                f"{where(pipeline, name, key)} must be {hint}, got {type(value).__name__} {value!r}"
            )
        return value

    params = typed("params", Mapping, "a mapping of argument -> value", {})
    raw_inputs = typed("inputs", Mapping, "a mapping of argument -> 'stage' or 'stage.key'", {})
    after = typed("after", (list, tuple), "a list of stage names", [])
    retry = parse_settings(pipeline, name, raw, defaults or {})
    metrics = typed("metrics", (list, tuple), "a list of output keys", [])
    watch = typed("watch", (list, tuple), "a list of file paths or globs", [])
    outs = typed("outs", (list, tuple), "a list of file or directory paths", [])

    inputs: dict[str, Ref] = {}
    for arg, source in raw_inputs.items():
        if not isinstance(source, str) or not source:
            raise ConfigTypeError(
                f"{where(pipeline, name, f'input {arg!r}')} must be 'stage' or 'stage.key', "
                f"got {type(source).__name__} {source!r}"
            )
        inputs[str(arg)] = Ref.parse(source)
    for item, what in ((after, "after"), (metrics, "metrics"), (watch, "watch"), (outs, "outs")):
        for value in item:
            if not isinstance(value, str):
                raise ConfigTypeError(
                    f"{where(pipeline, name, what)} items must be strings, got {value!r}"
                )
    for value in outs:
        if not value or any(c in value for c in "*?["):
            raise ConfigTypeError(
                f"{where(pipeline, name, 'outs')} item {value!r} is not a path: stages.{name}.outs "
                f"lists the files or directories the stage writes (no globs), e.g. "
                f"[data/combined.csv, data/raw/]"
            )
    cache, ttl = _cache(pipeline, name, raw.get("cache"))
    promote = _promote(pipeline, name, raw.get("promote"))
    both = sorted(set(inputs) & {str(k) for k in params})
    if both:
        raise DuplicateArgumentError(
            f"{where(pipeline, name)}: argument '{both[0]}' is given both in 'inputs' and in "
            f"'params'; keep one of them"
        )
    return Stage(
        name=name,
        target=target,
        params=MappingProxyType({str(k): v for k, v in params.items()}),
        inputs=MappingProxyType(inputs),
        after=tuple(after),
        **retry,
        model=bool(typed("model", bool, "true or false", False)),
        metrics=tuple(metrics),
        cache=cache,
        watch=tuple(watch),
        outs=tuple(outs),
        ttl=ttl,
        promote=promote[0],
        promote_metric=promote[1],
        promote_mode=promote[2],
        description=typed("description", str, "a string", ""),
        resources=_resources(pipeline, name, raw.get("resources")),
    )


def _cache(pipeline: str, name: str, raw: Any) -> tuple[bool, float | None]:
    """`cache: true|false` or `cache: {ttl: 5m}` (the stored output expires after 5 minutes)."""
    if raw is None or isinstance(raw, bool):
        return raw is not False, None
    hint = (
        f"set stages.{name}.cache to true, false or a mapping with a ttl such as {{ttl: 5m}} "
        f"(durations: 45s, 30m, 12h, 7d)"
    )
    if not isinstance(raw, Mapping):
        raise ConfigTypeError(
            f"{where(pipeline, name, 'cache')}: stages.{name}.cache must be true, false or "
            f"{{ttl: <duration>}}, got {type(raw).__name__} {raw!r}; {hint}"
        )
    check_keys(raw, ("ttl",), UnknownKeyError, where(pipeline, key=f"stages.{name}.cache"), hint)
    from .text import parse_duration

    value = raw.get("ttl")
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(repr(value))
        seconds = parse_duration(str(value))
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigTypeError(
            f"{where(pipeline, name, 'cache')}: stages.{name}.cache.ttl must be a positive "
            f"duration such as 5m, got {value!r}; {hint}"
        )
    return True, seconds


#: Keys of `promote: {...}` (the mapping form), with their meaning.
PROMOTE_KEYS = {
    "alias": "the alias to move, e.g. champion",
    "metric": "stage.key the new version must beat the holder on, e.g. evaluate.accuracy",
    "mode": "max (higher is better, the default) or min",
}
PROMOTE_MODES = ("max", "min")


def _promote(pipeline: str, name: str, raw: Any) -> tuple[str | None, str | None, str]:
    """`promote: champion` or `promote: {alias: champion, metric: evaluate.accuracy, mode: max}`
    as (alias, metric, mode); the metric's stage is checked against the graph later
    (`core/promotion.py`)."""
    key = f"stages.{name}.promote"
    hint = f"e.g. {key}=champion or {{alias: champion, metric: evaluate.accuracy, mode: max}}"
    if raw is None:
        return None, None, "max"
    if isinstance(raw, str):
        raw = {"alias": raw}
    if not isinstance(raw, Mapping):
        raise PromotionConfigError(
            f"{where(pipeline, key=key)} must be an alias name or a mapping "
            f"({', '.join(PROMOTE_KEYS)}), got {type(raw).__name__} {raw!r}; {hint}"
        )
    at = where(pipeline, key=key)
    check_keys(raw, PROMOTE_KEYS, PromotionConfigError, at, noun="a promote setting")
    alias, metric, mode = raw.get("alias"), raw.get("metric"), raw.get("mode", "max")
    if not isinstance(alias, str) or not alias.strip():
        raise PromotionConfigError(
            f"{where(pipeline, key=f'{key}.alias')} must be an alias name such as 'champion', "
            f"got {'nothing' if alias is None else repr(alias)}; {hint}"
        )
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise PromotionConfigError(
            f"{where(pipeline, key=f'{key}.alias')} '{alias}' is reserved by MLflow ('latest' "
            f"and v<number> name versions); pick another alias, e.g. champion"
        )
    if metric is not None and (not isinstance(metric, str) or "." not in metric.strip(".")):
        raise PromotionConfigError(
            f"{where(pipeline, key=f'{key}.metric')} must be 'stage.key' (a metric a stage "
            f"logs), e.g. evaluate.accuracy, got {metric!r}"
        )
    if mode is None:
        mode = "max"
    if not isinstance(mode, str) or mode not in PROMOTE_MODES:
        raise PromotionConfigError(
            f"{where(pipeline, key=f'{key}.mode')} must be max or min, got {mode!r}"
            f"{did_you_mean(str(mode), PROMOTE_MODES)}"
        )
    if metric is None and "mode" in raw:
        raise PromotionConfigError(
            f"{where(pipeline, key=f'{key}.mode')} is set without {key}.metric: say which "
            f"metric the new version must beat the holder on, e.g. {key}.metric=evaluate.accuracy"
        )
    return alias, metric, mode


def _resources(pipeline: str, name: str, raw: Any) -> Mapping[str, float]:
    """`resources: {GPU: 1}`: abstract worker resources (Dask's), positive numbers."""
    if raw is None:
        return MappingProxyType({})
    if not isinstance(raw, Mapping):
        raise ConfigTypeError(
            f"{where(pipeline, name, 'resources')} must be a mapping of resource -> amount, "
            f"e.g. {{GPU: 1}}, got {type(raw).__name__} {raw!r}"
        )
    for key, amount in raw.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigTypeError(
                f"{where(pipeline, name, f'resources.{key}')} must be a positive number, "
                f"got {amount!r}"
            )
    return MappingProxyType({str(k): v for k, v in raw.items()})


def interpolated_keys(unresolved: Any) -> frozenset[str]:
    """Top-level names referenced as `${name...}` anywhere in an unresolved container."""
    found: set[str] = set()
    stack = [unresolved]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str) and "${" in item:
            found.update(_INTERPOLATION.findall(item))
    return frozenset(found)


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted names (`opt.lr`), as MLflow shows and `explain` diffs them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def backend_name(section: Mapping[str, Any], default: str) -> str:
    """The `backend` of a `tracking`/`cache` section, with every spelling of off as "off".

    YAML reads a bare `off` as false, so `backend: off` arrives as False.
    """
    backend = section.get("backend", default)
    if backend is None or backend is False or str(backend).lower() in ("off", "false", "none"):
        return "off"
    return str(backend)

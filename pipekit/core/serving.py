"""The `serve` section: the inference DAG (request -> stages -> response) as a typed spec.

A serve stage either applies a training stage's registered model to one input
(`model: train`, `method: predict_proba`, `input: scale`) or calls a function
(`_target_`, `params`, `inputs`), like a training stage. Edges name `request` (the
scored rows) or another serve stage, and are checked with the training DAG's machinery
(`Graph`, `where()`, `did_you_mean()`), so the messages read alike:
``pipeline 'cancer': serve stage 'predict' model 'trian' is not a model stage (did you mean 'train'?)``.

`Inference` is the one meaning of the DAG: the exported MLflow model, the online server,
batch prediction and the input examples logged with stage models all call it. Standard
library only; models and functions come in from the caller.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import (
    CycleError,
    SelfEdgeError,
    ServeConfigError,
    SignatureError,
    TargetImportError,
    UnknownStageError,
    check_keys,
    did_you_mean,
    where,
)
from .graph import Graph
from .spec import PipelineSpec, Ref, Stage

log = logging.getLogger(__name__)

#: The name edges use for the request rows (a pandas DataFrame when served over HTTP).
REQUEST = "request"
#: What a model stage may call on the model object of its training stage.
METHODS = ("predict", "predict_proba", "transform")

#: Keys of the `serve` section, with a one-line meaning (used in errors and the docs).
SERVE_KEYS = {
    "stages": "the inference DAG: serve stage name -> model or function stage",
    "output": "the serve stage whose output answers a request (default: the last one)",
    "example": "{_target_, params}: a callable returning example request rows (the signature)",
    "alias": "the alias `pipekit export mlflow` moves and `pipekit serve` follows",
    "export_on_promote": "true: export after a run whose `promote` fired",
    "host": "address `pipekit serve` listens on",
    "port": "port `pipekit serve` listens on (0: any free port)",
    "workers": "server worker processes",
    "poll_interval": "seconds between checks of the followed alias",
    "max_body": "largest request body accepted, e.g. 10MB (larger: HTTP 413)",
    "timeout": "seconds a request may take before HTTP 504",
}
#: Keys of a serve stage that applies a model, and of one that calls a function.
MODEL_STAGE_KEYS = {
    "model": "the training stage (with `model: true`) whose registered model is applied",
    "method": f"what is called on the model: {' | '.join(METHODS)}",
    "version": "a version number, an alias (champion) or latest; default: the version the "
    "latest successful run produced",
    "input": f"what the model is applied to: '{REQUEST}', 'stage' or 'stage.key'",
    "description": "free text",
}
FUNCTION_STAGE_KEYS = {
    "_target_": "importable callable",
    "params": "mapping of literal keyword arguments",
    "inputs": f"mapping argument -> '{REQUEST}', 'stage' or 'stage.key'",
    "description": "free text",
}
EXAMPLE_KEYS = {"_target_": "callable returning example request rows", "params": "its arguments"}

DEFAULTS: dict[str, Any] = {
    "alias": "champion",
    "export_on_promote": False,
    "host": "127.0.0.1",
    "port": 8000,
    "workers": 1,
    "poll_interval": 5.0,
    "max_body": 10 * 1024 * 1024,
    "timeout": 60.0,
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b?)\s*$", re.I)


@dataclass(frozen=True, slots=True)
class ServeStage:
    """A node of the inference DAG: a model applied to one input, or a function call."""

    name: str
    model: str | None = None
    method: str = "predict"
    #: a version number, an alias, "latest", or None (the latest successful run's)
    version: int | str | None = None
    target: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    #: argument -> source; a model stage has exactly one, named "input"
    inputs: Mapping[str, Ref] = field(default_factory=dict)
    description: str = ""

    @property
    def upstream(self) -> tuple[str, ...]:
        """Serve stages this one waits for (`request` is not a stage), without duplicates."""
        return tuple(dict.fromkeys(r.stage for r in self.inputs.values() if r.stage != REQUEST))

    def as_stage(self) -> Stage:
        """A function stage as a training `Stage`, for `core.targets`' signature checks."""
        return Stage(self.name, self.target or "", self.params, self.inputs)


@dataclass(frozen=True, slots=True)
class Example:
    """The callable that returns example request rows: the exported model's signature."""

    target: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServeSpec:
    """The parsed `serve` section of pipeline `pipeline`, its stages in run order."""

    pipeline: str
    stages: Mapping[str, ServeStage]
    order: tuple[str, ...]
    output: str
    example: Example | None = None
    alias: str | None = "champion"
    export_on_promote: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    poll_interval: float = 5.0
    max_body: int = 10 * 1024 * 1024
    timeout: float = 60.0

    @property
    def model_name(self) -> str:
        """The registered model the inference DAG is exported as."""
        return f"{self.pipeline}.serving"

    def registered(self, stage: str) -> str:
        """The registered model of training stage `stage`."""
        return f"{self.pipeline}.{stage}"

    @property
    def models(self) -> dict[str, int | str | None]:
        """Training model stages the DAG applies -> the version each serve stage asks for."""
        found: dict[str, int | str | None] = {}
        for stage in self.stages.values():
            if stage.model is not None:
                found.setdefault(stage.model, stage.version)
        return found


# --- parsing: shapes, names, edges, cycles --------------------------------------------------


def _at(pipeline: str, stage: str, key: str | None = None) -> str:
    """`pipeline 'p': serve stage 's' key`: where() with the serve DAG's noun."""
    return f"{where(pipeline)}: serve stage '{stage}'" + (f" {key}" if key else "")


def parse_serve(pipeline: str, section: Any) -> ServeSpec | None:
    """The `serve` section parsed and its DAG checked (edges, cycles, output); None if absent.

    Model stages are checked against the training DAG by `check_serve`.
    """
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ServeConfigError(
            f"{where(pipeline, key='serve')} must be a mapping with 'stages' (the inference "
            f"DAG), got {type(section).__name__} {section!r}"
        )
    check_keys(
        section, SERVE_KEYS, ServeConfigError, where(pipeline, key="serve"), noun="a serve setting"
    )
    raw = section.get("stages")
    if not isinstance(raw, Mapping) or not raw:
        got = "nothing" if not raw else f"{type(raw).__name__} {raw!r}"
        raise ServeConfigError(
            f"{where(pipeline, key='serve.stages')} must be a non-empty mapping of serve stage "
            f"name -> stage (e.g. predict: {{model: train, input: {REQUEST}}}), got {got}"
        )
    stages = {str(name): _parse_stage(pipeline, str(name), body) for name, body in raw.items()}
    for stage in stages.values():
        for arg, ref in stage.inputs.items():
            _check_ref(pipeline, stage, arg, ref, stages)
    graph = Graph({name: stage.upstream for name, stage in stages.items()})
    cycle = graph.find_cycle()
    if cycle:
        raise CycleError(f"{where(pipeline)}: serve cycle {' -> '.join(cycle)}", cycle)
    order = tuple(graph.order())
    settings = {
        key: _setting(pipeline, key, section[key]) if key in section else DEFAULTS[key]
        for key in DEFAULTS
    }
    return ServeSpec(
        pipeline=pipeline,
        stages=MappingProxyType(stages),
        order=order,
        output=_output(pipeline, section.get("output"), stages, graph),
        example=_example(pipeline, section.get("example")),
        **settings,
    )


def _parse_stage(pipeline: str, name: str, raw: Any) -> ServeStage:
    if not _IDENTIFIER.match(name) or name == REQUEST:
        why = (
            f"'{REQUEST}' names the request rows"
            if name == REQUEST
            else "stage names must be Python identifiers"
        )
        raise ServeConfigError(f"{_at(pipeline, name)}: {why}; rename it (serve.stages.{name})")
    if not isinstance(raw, Mapping):
        raise ServeConfigError(
            f"{_at(pipeline, name)}: must be a mapping with 'model' (apply a training stage's "
            f"model) or '_target_' (call a function), got {type(raw).__name__} {raw!r}"
        )
    if "model" in raw and "_target_" in raw:
        raise ServeConfigError(
            f"{_at(pipeline, name)}: has both 'model' and '_target_'; a serve stage applies a "
            f"model or calls a function, so split it into two stages"
        )
    if "model" not in raw and "_target_" not in raw:
        raise ServeConfigError(
            f"{_at(pipeline, name)}: needs 'model: <training stage>' to apply a registered "
            f"model, or '_target_' to call a function"
        )
    is_model = "model" in raw
    known = MODEL_STAGE_KEYS if is_model else FUNCTION_STAGE_KEYS

    def hint(key: str) -> str:
        if is_model and key == "inputs":
            return f"a model stage takes one `input:`, e.g. input: {REQUEST}"
        if not is_model and key in MODEL_STAGE_KEYS:
            return "that is a key of model stages, which have `model:`"
        return ""

    check_keys(raw, known, ServeConfigError, _at(pipeline, name), hint)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ServeConfigError(f"{_at(pipeline, name, 'description')} must be a string")
    if is_model:
        model, method = raw.get("model"), raw.get("method", "predict")
        if not isinstance(model, str) or not model:
            raise ServeConfigError(
                f"{_at(pipeline, name, 'model')} must name a training stage with "
                f"`model: true`, got {model!r}"
            )
        if method not in METHODS:
            raise ServeConfigError(
                f"{_at(pipeline, name, 'method')} '{method}' is not one of "
                f"{', '.join(METHODS)}{did_you_mean(str(method), METHODS)}"
            )
        source = raw.get("input", REQUEST)
        if not isinstance(source, str) or not source:
            raise ServeConfigError(
                f"{_at(pipeline, name, 'input')} must be '{REQUEST}', 'stage' or 'stage.key', "
                f"got {source!r}"
            )
        return ServeStage(
            name,
            model=model,
            method=method,
            version=_version(pipeline, name, raw.get("version")),
            inputs=MappingProxyType({"input": Ref.parse(source)}),
            description=description,
        )
    target, params, inputs = raw.get("_target_"), raw.get("params") or {}, raw.get("inputs") or {}
    if not isinstance(target, str) or not target:
        raise ServeConfigError(
            f"{_at(pipeline, name, '_target_')} must be the dotted path of a callable, got "
            f"{target!r}"
        )
    for key, value, hint in (("params", params, "argument -> value"), ("inputs", inputs, "")):
        if not isinstance(value, Mapping):
            raise ServeConfigError(
                f"{_at(pipeline, name, key)} must be a mapping of "
                f"{hint or f'argument -> {REQUEST!r}, stage or stage.key'}, got "
                f"{type(value).__name__} {value!r}"
            )
    refs = {}
    for arg, source in inputs.items():
        if not isinstance(source, str) or not source:
            raise ServeConfigError(
                f"{_at(pipeline, name, f'input {arg!r}')} must be '{REQUEST}', 'stage' or "
                f"'stage.key', got {source!r}"
            )
        refs[str(arg)] = Ref.parse(source)
    both = sorted(set(refs) & {str(k) for k in params})
    if both:
        raise ServeConfigError(
            f"{_at(pipeline, name)}: argument '{both[0]}' is given both in 'inputs' and in "
            f"'params'; keep one of them"
        )
    return ServeStage(
        name,
        target=target,
        params=MappingProxyType({str(k): v for k, v in params.items()}),
        inputs=MappingProxyType(refs),
        description=description,
    )


def _version(pipeline: str, stage: str, value: Any) -> int | str | None:
    """A version number, `latest`, an alias name, or None for the default."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and _ALIAS.match(value):
        return value
    raise ServeConfigError(
        f"{_at(pipeline, stage, 'version')} must be a version number (3), an alias "
        f"(champion), latest, or null for the version the latest successful run produced; "
        f"got {type(value).__name__} {value!r}"
    )


def _check_ref(
    pipeline: str, stage: ServeStage, arg: str, ref: Ref, stages: Mapping[str, ServeStage]
) -> None:
    what = "input" if stage.model is not None else f"input '{arg}'"
    if ref.stage == stage.name:
        raise SelfEdgeError(
            f"{_at(pipeline, stage.name, what)} refers to the stage itself; a stage cannot "
            f"depend on its own output",
            [stage.name, stage.name],
        )
    if ref.stage != REQUEST and ref.stage not in stages:
        raise UnknownStageError(
            f"{_at(pipeline, stage.name, what)} refers to unknown serve stage '{ref.stage}'"
            f"{did_you_mean(ref.stage, [REQUEST, *stages])}; inputs are '{REQUEST}' or one "
            f"of {', '.join(stages)}"
        )


def _output(pipeline: str, output: Any, stages: Mapping[str, ServeStage], graph: Graph) -> str:
    if output is not None:
        if not isinstance(output, str) or output not in stages:
            raise UnknownStageError(
                f"{where(pipeline, key='serve.output')} '{output}' is not a serve stage"
                f"{did_you_mean(str(output), stages)}; serve stages are {', '.join(stages)}"
            )
        return output
    used = {dep for deps in graph.deps.values() for dep in deps}
    sinks = [name for name in graph.order() if name not in used]
    if len(sinks) > 1:
        raise ServeConfigError(
            f"{where(pipeline, key='serve.output')} is not set and {len(sinks)} serve stages "
            f"end the DAG ({', '.join(sinks)}); set serve.output to the one that answers "
            f"requests"
        )
    return sinks[0]


def _example(pipeline: str, raw: Any) -> Example | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("_target_"), str):
        raise ServeConfigError(
            f"{where(pipeline, key='serve.example')} must be a mapping with '_target_' (a "
            f"callable returning example request rows) and optional 'params', got {raw!r}"
        )
    at = where(pipeline, key="serve.example")
    check_keys(raw, EXAMPLE_KEYS, ServeConfigError, at, noun="a key of the example")
    params = raw.get("params") or {}
    if not isinstance(params, Mapping):
        raise ServeConfigError(
            f"{where(pipeline, key='serve.example.params')} must be a mapping, got {params!r}"
        )
    return Example(raw["_target_"], MappingProxyType(dict(params)))


def _setting(pipeline: str, key: str, value: Any) -> Any:
    """A scalar setting checked (null means the default; `alias: null` follows no alias)."""
    if value is None:
        return None if key == "alias" else DEFAULTS[key]
    full = f"serve.{key}"
    shown = f"{type(value).__name__} {value!r}"
    if key == "alias":
        if isinstance(value, str) and _ALIAS.match(value) and not value.isdigit():
            return value
        raise ServeConfigError(
            f"{where(pipeline, key=full)} must be an alias name such as champion (or null to "
            f"follow the latest version), got {shown}"
        )
    if key == "export_on_promote":
        if isinstance(value, bool):
            return value
        raise ServeConfigError(f"{where(pipeline, key=full)} must be true or false, got {shown}")
    if key == "host":
        if isinstance(value, str) and value:
            return value
        raise ServeConfigError(
            f"{where(pipeline, key=full)} must be an address such as 127.0.0.1, got {shown}"
        )
    if key in ("port", "workers"):
        low, high = (0, 65535) if key == "port" else (1, 256)
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        free = " (0 picks a free port)" if key == "port" else ""
        raise ServeConfigError(
            f"{where(pipeline, key=full)} must be an integer from {low} to {high}{free}, "
            f"got {shown}"
        )
    if key == "max_body":
        size = _size(value)
        if size is not None and size > 0:
            return size
        raise ServeConfigError(
            f"{where(pipeline, key=full)} must be a size such as 10MB or a byte count, got {shown}"
        )
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is not None and math.isfinite(number) and number > 0:
        return float(number)
    raise ServeConfigError(
        f"{where(pipeline, key=full)} must be a positive number of seconds, got {shown}"
    )


def _size(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        return None
    return int(float(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " "))


# --- checks against the training DAG and the callables -------------------------------------


def check_serve(spec: PipelineSpec) -> ServeSpec | None:
    """The pipeline's `serve` section, fully checked: shapes, edges and cycles, model stages
    against the training DAG, function and example targets against their signatures."""
    serve = parse_serve(spec.name, spec.config.get("serve"))
    if serve is None:
        return None
    models = [name for name, stage in spec.stages.items() if stage.model]
    pinned: dict[str, tuple[str, int | str | None]] = {}
    for stage in serve.stages.values():
        if stage.model is None:
            continue
        if stage.model not in models:
            known = f"model stages are {', '.join(models)}" if models else "no stage has one"
            hint = (
                f"stage '{stage.model}' has no `model: true`; "
                if stage.model in spec.stages
                else ""
            )
            raise ServeConfigError(
                f"{_at(spec.name, stage.name, 'model')} '{stage.model}' is not a model stage"
                f"{did_you_mean(stage.model, models)}; {hint}{known} "
                f"(training stages with `model: true`)"
            )
        first = pinned.setdefault(stage.model, (stage.name, stage.version))
        if first[1] != stage.version:
            raise ServeConfigError(
                f"{_at(spec.name, stage.name, 'version')} {stage.version!r} differs from "
                f"serve stage '{first[0]}' version {first[1]!r} for the same model "
                f"'{stage.model}'; one inference DAG applies one version of each model"
            )
    functions(serve)
    if serve.example is not None:
        example_function(serve)
    return serve


def functions(serve: ServeSpec) -> dict[str, Callable[..., Any]]:
    """The callables of the function stages, imported and checked against their params."""
    from .targets import check_signature, resolve

    found = {}
    for stage in serve.stages.values():
        if stage.target is None:
            continue
        as_stage = stage.as_stage()
        try:
            func = resolve(serve.pipeline, as_stage)
            check_signature(serve.pipeline, as_stage, func)
        except (TargetImportError, SignatureError) as exc:
            raise _reworded(exc, serve.pipeline, stage.name) from exc.__cause__
        found[stage.name] = func
    return found


def example_function(serve: ServeSpec) -> Callable[..., Any]:
    """The `serve.example` callable, imported and checked against its params."""
    from .targets import check_signature, resolve

    assert serve.example is not None
    as_stage = Stage("example", serve.example.target, serve.example.params)
    try:
        func = resolve(serve.pipeline, as_stage)
        check_signature(serve.pipeline, as_stage, func)
    except (TargetImportError, SignatureError) as exc:
        message = str(exc).replace(
            f"{where(serve.pipeline, 'example')}", f"{where(serve.pipeline, key='serve.example')}"
        )
        raise type(exc)(message) from exc.__cause__
    return func


def _reworded(exc: Exception, pipeline: str, stage: str) -> Exception:
    """A training-stage message (`stage 'x' ...`) about a serve stage, said as one."""
    message = str(exc).replace(f"{where(pipeline, stage)}", _at(pipeline, stage), 1)
    return type(exc)(message)


# --- evaluation -----------------------------------------------------------------------------


class Inference:
    """The inference DAG bound to its model objects and functions: `inference(request)`.

    `models` maps training stage -> model object, `funcs` function stage -> callable.
    Steps are compiled once; a call is a loop over them, so the DAG costs microseconds.
    With `until`, only the stages before serve stage `until` are bound and run (`trace`).
    """

    __slots__ = ("serve", "steps")

    def __init__(
        self,
        serve: ServeSpec,
        models: Mapping[str, Any],
        funcs: Mapping[str, Callable[..., Any]],
        *,
        until: str | None = None,
    ):
        self.serve = serve
        order = serve.order if until is None else serve.order[: serve.order.index(until)]
        steps = []
        for name in order:
            stage = serve.stages[name]
            if stage.model is not None:
                call = getattr(models[stage.model], stage.method)
                steps.append((name, call, None, tuple(stage.inputs.values())))
            else:
                args = tuple(stage.inputs.items())
                steps.append((name, funcs[name], dict(stage.params), args))
        self.steps = tuple(steps)

    def __call__(self, request: Any) -> Any:
        return self.trace(request)[self.serve.output]

    def trace(self, request: Any) -> dict[str, Any]:
        """Every (bound) stage's output for `request`, by name; `request` too."""
        values: dict[str, Any] = {REQUEST: request}
        for name, call, params, args in self.steps:
            if params is None:  # a model stage: one positional input
                values[name] = call(_take(values, args[0]))
            else:
                kwargs = dict(params)
                for arg, ref in args:
                    kwargs[arg] = _take(values, ref)
                values[name] = call(**kwargs)
        return values


def _take(values: Mapping[str, Any], ref: Ref) -> Any:
    value = values[ref.stage]
    return value if ref.key is None else value[ref.key]


class StageExamples:
    """Input examples for a pipeline's model stages: what the serve section's example
    request becomes when it reaches the stage that applies each model.

    Tracking logs each stage model with it (so the version gets a signature). `add` the
    model objects (or zero-argument loaders) as the run produces them; `input_for` is None
    when the pipeline has no `serve.example`, does not serve the stage, or a model the
    path needs is not at hand. It never raises: a missing example only means no signature.
    """

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self._models: dict[str, Any] = {}
        self._loaders: dict[str, Callable[[], Any]] = {}
        self._serve: ServeSpec | bool | None = False
        self._request: Any = None

    def add(self, stage: str, model: Any = None, *, load: Callable[[], Any] | None = None) -> None:
        if load is not None:
            self._loaders[stage] = load
        elif model is not None:
            self._models[stage] = model

    def input_for(self, stage: str, model: Any) -> Any:
        self.add(stage, model)
        try:
            return self._input_for(stage)
        except Exception as exc:  # the example is optional: log why it is missing
            log.info("pipekit: no input example for model stage '%s': %s", stage, exc)
            return None

    def _input_for(self, stage: str) -> Any:
        if self._serve is False:
            self._serve = parse_serve(self.spec.name, self.spec.config.get("serve"))
        serve = self._serve
        if not isinstance(serve, ServeSpec) or serve.example is None:
            return None
        users = [name for name in serve.order if serve.stages[name].model == stage]
        if not users:
            return None
        first = users[0]
        before = serve.order[: serve.order.index(first)]
        needed = {serve.stages[n].model for n in before if serve.stages[n].model}
        for name in needed:
            if name not in self._models:
                if name not in self._loaders:
                    return None
                self._models[name] = self._loaders.pop(name)()
        if self._request is None:
            example = example_function(serve)
            self._request = example(**serve.example.params)
        inference = Inference(serve, self._models, functions(serve), until=first)
        return _take(inference.trace(self._request), serve.stages[first].inputs["input"])

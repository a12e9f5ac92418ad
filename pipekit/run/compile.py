"""Compile a validated pipeline into one low-level Dask task graph.

One task per stage, keyed by the stage name. A stage task never raises: it returns a
`Failed` marker (also for `sys.exit` in the stage, or, under `processes`, an output that
cannot be pickled), and stages downstream of it return `Skipped`, so independent branches
still finish (like `make -k`) and the driver learns every stage's fate from the outputs.
Only an interrupt (KeyboardInterrupt: Ctrl-C, SIGTERM) goes through: it stops the run.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..core.spec import PipelineSpec
from ..errors import OutputKeyError, UnpicklableOutputError, where
from .fanin import stage_args

#: The key of the task that gathers stage outputs; not an identifier, so no stage clashes.
GATHER_KEY = "pipekit:outputs"


class Failed:
    """The output of a stage that raised: the error and its formatted traceback."""

    __slots__ = ("attempts", "error", "stage", "traceback")

    def __init__(self, stage: str, error: BaseException, tb: str, attempts: int):
        self.stage, self.error, self.traceback, self.attempts = stage, error, tb, attempts

    def __reduce__(self):  # exceptions that cannot pickle still cross process borders
        try:
            import pickle

            pickle.dumps(self.error)
            error = self.error
        except Exception:
            error = RuntimeError(f"{type(self.error).__name__}: {self.error}")
        return (Failed, (self.stage, error, self.traceback, self.attempts))


class Skipped:
    """The output of a stage that did not run because `because` failed upstream."""

    __slots__ = ("because", "stage")

    def __init__(self, stage: str, because: str):
        self.stage, self.because = stage, because

    def __reduce__(self):
        return (Skipped, (self.stage, self.because))


class StageTask:
    """Picklable callable that runs one stage: gathers kwargs, calls, retries."""

    __slots__ = ("args", "func", "params", "pipeline", "retries", "stage")

    def __init__(
        self,
        pipeline: str,
        stage: str,
        func: Callable[..., Any],
        params: Mapping[str, Any],
        args: tuple[tuple[str, int, str | None, str], ...],
        retries: int,
    ):
        self.pipeline, self.stage, self.func = pipeline, stage, func
        self.params, self.args, self.retries = dict(params), args, retries

    def __reduce__(self):
        return (
            StageTask,
            (self.pipeline, self.stage, self.func, self.params, self.args, self.retries),
        )

    def __call__(self, *upstream: Any) -> Any:
        for value in upstream:
            if isinstance(value, Failed):
                return Skipped(self.stage, value.stage)
            if isinstance(value, Skipped):
                return Skipped(self.stage, value.because)
        kwargs = dict(self.params)
        for arg, index, key, source in self.args:
            value = upstream[index]
            if key is not None:
                try:
                    value = output_key(value, key)
                except Exception as exc:
                    return Failed(self.stage, self._key_error(arg, source, key, value, exc), "", 0)
            kwargs[arg] = value
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.func(**kwargs)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run stops, not the stage
                raise
            except BaseException as exc:  # SystemExit too: a stage must not end the process
                if attempt > self.retries:
                    return Failed(self.stage, exc, traceback.format_exc(), attempt)

    def _key_error(self, arg: str, source: str, key: str, value: Any, exc: Exception) -> Exception:
        if isinstance(value, Mapping):
            available = ", ".join(map(str, list(value)[:10]))
            reason = f"its output has no key '{key}' (keys: {available})"
        else:
            reason = f"its output is a {type(value).__name__}, not a mapping with key '{key}'"
        message = (
            f"{where(self.pipeline, self.stage, f'input {arg!r}')} wants '{source}.{key}', "
            f"but stage '{source}' returned no such key: {reason}; return a dict from "
            f"'{source}' or use inputs: {{{arg}: {source}}}"
        )
        return OutputKeyError(message, pipeline=self.pipeline, stage=self.stage, cause=exc)


def gather(*outputs: Any) -> tuple[Any, ...]:
    return outputs


def build_graph(
    spec: PipelineSpec,
    funcs: Mapping[str, Callable[..., Any]],
    stages: Iterable[str],
    *,
    replace: Mapping[str, tuple] | None = None,
) -> dict[str, Any]:
    """The low-level task graph for `stages` (an upstream-closed set, in topological order).

    `replace` swaps a stage's task for another (the cache uses it to load stored outputs).
    """
    dsk: dict[str, Any] = {}
    replace = replace or {}
    stage_map = spec.stages
    for name in stages:
        if name in replace:
            dsk[name] = replace[name]
            continue
        stage = stage_map[name]
        upstream = stage.upstream
        position = {dep: i for i, dep in enumerate(upstream)}
        func = funcs[name]
        if any(ref.members for ref in stage.inputs.values()):  # matrix fan-in (run/fanin.py)
            func, args = stage_args(stage, func, position)
        else:
            args = tuple(
                (arg, position[ref.stage], ref.key, ref.stage) for arg, ref in stage.inputs.items()
            )
        task = StageTask(spec.name, name, func, stage.params, args, stage.retries)
        dsk[name] = (task, *upstream)
    return dsk


class Value:
    """A task returning an already loaded value (a literal in a task tuple could be read
    as a key or a task)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __reduce__(self):
        return (Value, (self.value,))

    def __call__(self) -> Any:
        return self.value


class Portable:
    """Wraps a stage task for a worker process: pickles the output there, so an output
    that cannot travel to the driver fails its own stage instead of the whole run.

    The pickle is made once: `Pickled` hands Dask the bytes and unpickles in the driver.
    """

    __slots__ = ("pipeline", "stage", "task")

    def __init__(self, pipeline: str, stage: str, task: Callable[..., Any]):
        self.pipeline, self.stage, self.task = pipeline, stage, task

    def __reduce__(self):
        return (Portable, (self.pipeline, self.stage, self.task))

    def __call__(self, *upstream: Any) -> Any:
        output = self.task(*upstream)
        if isinstance(output, Failed | Skipped):
            return output
        import pickle

        import cloudpickle

        try:
            return Pickled(cloudpickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            kind = type(output)
            name = kind.__qualname__ if kind.__module__ == "builtins" else _qualified(kind)
            message = (
                f"{where(self.pipeline, self.stage)} returned a {name} that cannot be sent "
                f"between processes ({type(exc).__name__}: {exc}); return picklable data or "
                f"use executor=threads"
            )
            tb = traceback.format_exc()
            error = UnpicklableOutputError(
                message, pipeline=self.pipeline, stage=self.stage, cause=exc, traceback=tb
            )
            return Failed(self.stage, error, tb, 1)


class Pickled:
    """A value pickled in a worker; unpickling it in the driver gives the value back."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        import pickle

        return (pickle.loads, (self.data,))


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def output_key(output: Any, key: str) -> Any:
    """`output[key]`, or the field `key` of a dataclass output (validation accepts both)."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return getattr(output, key)
    return output[key]

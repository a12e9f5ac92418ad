"""Compile a validated pipeline into one low-level Dask task graph.

One task per stage, keyed by the stage name. A stage task never raises: it returns a
`Failed` marker (also for `sys.exit` in the stage, or, under `processes`, an output that
cannot be pickled), and stages downstream of it return `Skipped`, so independent branches
still finish (like `make -k`) and the driver learns every stage's fate from the outputs.
Only an interrupt (KeyboardInterrupt: Ctrl-C, SIGTERM) goes through: it stops the run.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from ..core.retry import exception_classes
from ..core.spec import PipelineSpec
from ..errors import OutputKeyError, StageTimeoutError, UnpicklableOutputError, where
from .fanin import stage_args

#: The key of the task that gathers stage outputs; not an identifier, so no stage clashes.
GATHER_KEY = "pipekit:outputs"


class Failed:
    """The output of a stage that raised: the error and its formatted traceback, the
    attempts made (`attempts`) of those allowed (`allowed`), every attempt's error."""

    __slots__ = ("allowed", "attempts", "error", "errors", "stage", "traceback")

    def __init__(
        self,
        stage: str,
        error: BaseException,
        tb: str,
        attempts: int,
        errors: tuple[str, ...] = (),
        allowed: int = 0,
    ):
        self.stage, self.error, self.traceback, self.attempts = stage, error, tb, attempts
        self.errors, self.allowed = tuple(errors), max(allowed, attempts)

    def __reduce__(self):  # exceptions that cannot pickle still cross process borders
        try:
            import pickle

            pickle.dumps(self.error)
            error = self.error
        except Exception:
            error = RuntimeError(f"{type(self.error).__name__}: {self.error}")
        return (
            Failed,
            (self.stage, error, self.traceback, self.attempts, self.errors, self.allowed),
        )


class Attempts(NamedTuple):
    """A stage that passed after retries: attempts made, allowed, the failed ones' errors."""

    attempt: int
    allowed: int
    errors: tuple[str, ...]


#: Attempt logs of stages that passed after failing, by (graph token, stage). A stage
#: task cannot call observers: it leaves its log here (the driver's process under sync and
#: threads; `Portable` carries it back from a worker process) and `execute` pops it.
ATTEMPTS: dict[tuple[str, str], Attempts] = {}


def attempt_log(task: Any, stage: str) -> Attempts | None:
    """Pop the attempt log left by the stage task inside `task` (StoreTask, Portable...)."""
    for _ in range(8):  # wrappers keep the stage task as `.task`
        if isinstance(task, StageTask):
            return ATTEMPTS.pop((task.token, stage), None)
        task = getattr(task, "task", None)
    return None


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class Skipped:
    """The output of a stage that did not run because `because` failed upstream."""

    __slots__ = ("because", "stage")

    def __init__(self, stage: str, because: str):
        self.stage, self.because = stage, because

    def __reduce__(self):
        return (Skipped, (self.stage, self.because))


class StageTask:
    """Picklable callable that runs one stage: gathers kwargs, calls, retries.

    A failing attempt is retried `retries` times, after `retry_delay * retry_backoff **
    (n - 1)` seconds, unless `retry_on` is set and the error is none of its classes. With
    a `timeout` each attempt runs in a helper daemon thread the task waits for: past the
    limit the attempt fails with StageTimeoutError and its thread is abandoned (Python
    cannot stop a thread); in a worker process the worker retires after the task
    (`pools.retire_worker`), so the abandoned thread dies with it.
    """

    __slots__ = (
        "args",
        "func",
        "params",
        "pipeline",
        "retries",
        "retry_backoff",
        "retry_delay",
        "retry_on",
        "stage",
        "timeout",
        "token",
    )

    def __init__(
        self,
        pipeline: str,
        stage: str,
        func: Callable[..., Any],
        params: Mapping[str, Any],
        args: tuple[tuple[str, int, str | None, str], ...],
        retries: int,
        retry_delay: float = 0.0,
        retry_backoff: float = 1.0,
        retry_on: tuple[type, ...] = (),
        timeout: float | None = None,
        token: str = "",
    ):
        self.pipeline, self.stage, self.func = pipeline, stage, func
        self.params, self.args, self.retries = dict(params), args, retries
        self.retry_delay, self.retry_backoff = retry_delay, retry_backoff
        self.retry_on, self.timeout, self.token = tuple(retry_on), timeout, token

    def __reduce__(self):
        return (
            StageTask,
            (
                self.pipeline,
                self.stage,
                self.func,
                self.params,
                self.args,
                self.retries,
                self.retry_delay,
                self.retry_backoff,
                self.retry_on,
                self.timeout,
                self.token,
            ),
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
        allowed = self.retries + 1
        errors: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                output = self._attempt(kwargs, attempt, allowed)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run stops, not the stage
                raise
            except BaseException as exc:  # SystemExit too: a stage must not end the process
                errors.append(_error_text(exc))
                retry = not self.retry_on or isinstance(exc, self.retry_on)
                if attempt >= allowed or not retry:
                    tb = traceback.format_exc()
                    return Failed(self.stage, exc, tb, attempt, tuple(errors), allowed)
                del exc
                delay = self.retry_delay * self.retry_backoff ** (attempt - 1)
                if delay > 0:
                    time.sleep(delay)
                continue
            if errors:
                ATTEMPTS[(self.token, self.stage)] = Attempts(attempt, allowed, tuple(errors))
            return output

    def _attempt(self, kwargs: dict[str, Any], attempt: int, allowed: int) -> Any:
        """One call of the stage; with a timeout, in a daemon thread we stop waiting for."""
        if self.timeout is None:
            return self.func(**kwargs)
        box: dict[str, Any] = {}
        finished = threading.Event()

        def call() -> None:
            try:
                box["output"] = self.func(**kwargs)
            except BaseException as exc:
                box["error"] = exc
            finally:
                finished.set()

        context = contextvars.copy_context()
        name = f"pipekit-{self.stage}-attempt-{attempt}"
        threading.Thread(target=context.run, args=(call,), name=name, daemon=True).start()
        if not finished.wait(self.timeout):
            from .pools import retire_worker

            retire_worker()  # in a worker process: replaced after this task
            tries = f" (attempt {attempt}/{allowed})" if allowed > 1 else ""
            raise StageTimeoutError(
                f"{where(self.pipeline, self.stage)} timed out after "
                f"{duration_text(self.timeout)}{tries}; raise stages.{self.stage}.timeout "
                f"if it needs longer",
                pipeline=self.pipeline,
                stage=self.stage,
            )
        if "error" in box:
            raise box.pop("error")
        return box["output"]

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
    token = uuid.uuid4().hex  # names this graph's attempt logs (ATTEMPTS)
    stage_map = spec.stages
    pipeline = spec.name
    for name in stages:
        if name in replace:
            dsk[name] = replace[name]
            continue
        stage = stage_map[name]
        func = funcs[name]
        inputs = stage.inputs
        if not inputs and not stage.after:  # a source stage (most matrix members)
            upstream: tuple[str, ...] = ()
            args: tuple = ()
        else:
            upstream = stage.upstream
            position = {dep: i for i, dep in enumerate(upstream)}
            if any(ref.members for ref in inputs.values()):  # matrix fan-in (run/fanin.py)
                func, args = stage_args(stage, func, position)
            else:
                args = tuple(
                    (arg, position[ref.stage], ref.key, ref.stage) for arg, ref in inputs.items()
                )
        retry_on = stage.retry_on
        task = StageTask(
            pipeline,
            name,
            func,
            stage.params,
            args,
            stage.retries,
            stage.retry_delay,
            stage.retry_backoff,
            exception_classes(pipeline, name, retry_on) if retry_on else (),
            stage.timeout,
            token,
        )
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
            data = cloudpickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)
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
        log = attempt_log(self.task, self.stage)
        if log is None:
            return Pickled(data)
        return Pickled(data, (_token(self.task), self.stage, log))


def _token(task: Any) -> str:
    while not isinstance(task, StageTask):
        task = task.task
    return task.token


class Pickled:
    """A value pickled in a worker; unpickling it in the driver gives the value back (and
    files the stage's attempt log there, where `execute` reads it)."""

    __slots__ = ("data", "log")

    def __init__(self, data: bytes, log: tuple[str, str, Attempts] | None = None):
        self.data, self.log = data, log

    def __reduce__(self):
        import pickle

        if self.log is None:
            return (pickle.loads, (self.data,))
        return (_arrived, (self.data, *self.log))


def _arrived(data: bytes, token: str, stage: str, log: tuple[int, int, tuple[str, ...]]) -> Any:
    """Unpickle a worker's output in the driver and keep its stage's attempt log."""
    import pickle

    ATTEMPTS[(token, stage)] = Attempts(*log)
    return pickle.loads(data)


def duration_text(seconds: float) -> str:
    """30s, 5m, 2h, 1.5s: a configured duration as the user wrote it."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def output_key(output: Any, key: str) -> Any:
    """`output[key]`, or the field `key` of a dataclass output (validation accepts both)."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return getattr(output, key)
    return output[key]

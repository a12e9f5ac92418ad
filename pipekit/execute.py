"""Compile a validated pipeline into one low-level Dask graph and compute it.

One task per stage, keyed by the stage name, wrapped as a single `Delayed`. A stage task
never raises: it returns a `Failed` marker, and stages downstream of it return `Skipped`,
so independent branches still finish (like `make -k`) and the driver learns every
stage's fate from one gathered result. Stage events are emitted from Dask's scheduler
callbacks, which run in the driver for the sync, threads and processes schedulers.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import OutputKeyError, where
from .events import Observer, StageEvent
from .spec import PipelineSpec

#: The key of the task that gathers stage outputs; not an identifier, so no stage clashes.
GATHER_KEY = "pipekit:outputs"

SCHEDULERS = ("sync", "threads", "processes")


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
                    value = value[key]
                except Exception as exc:
                    return Failed(self.stage, self._key_error(arg, source, key, value, exc), "", 0)
            kwargs[arg] = value
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.func(**kwargs)
            except Exception as exc:
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


def _gather(*outputs: Any) -> tuple[Any, ...]:
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
        args = tuple(
            (arg, position[ref.stage], ref.key, ref.stage) for arg, ref in stage.inputs.items()
        )
        task = StageTask(spec.name, name, funcs[name], stage.params, args, stage.retries)
        dsk[name] = (task, *upstream)
    return dsk


class StageTimer:
    """Times stages from Dask's scheduler callbacks and turns them into stage events.

    Events are built only when someone listens: with no observer the callbacks just
    record two timestamps per stage.
    """

    def __init__(
        self,
        stages: Mapping[str, Any],
        observer: Observer | None = None,
        *,
        reasons: Mapping[str, str] | None = None,
        meta: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.stages = stages
        self.observer = observer or None
        self.reasons = reasons or {}  # why each stage runs (from the cache's plan)
        self.meta = meta or {}  # e.g. {"cache_key": ...} of stages that write an entry
        self.started: dict[str, float] = {}
        self.durations: dict[str, float] = {}

    def callback(self) -> tuple:
        from dask.callbacks import Callback

        return Callback(pretask=self._pretask, posttask=self._posttask)._callback

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        if key in self.stages:
            now = self.started[key] = time.perf_counter()
            if self.observer is not None and not _upstream_failed(key, state):
                reason = self.reasons.get(key, "")
                self.observer.stage_changed(StageEvent(key, "running", now, reason=reason))

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if key in self.stages:
            now = time.perf_counter()
            duration = self.durations[key] = now - self.started[key]
            if self.observer is not None:
                event = outcome_event(
                    key, result, now, duration, self.reasons.get(key, ""), self.meta.get(key)
                )
                self.observer.stage_changed(event)


def _upstream_failed(key: str, state: Any) -> bool:
    """True when the task will only pass on an upstream failure: it never really runs."""
    results = state.get("cache", {})
    return any(
        isinstance(results.get(dep), Failed | Skipped) for dep in state["dependencies"].get(key, ())
    )


def outcome_event(
    stage: str,
    output: Any,
    at: float,
    duration: float | None,
    reason: str = "",
    meta: Mapping[str, Any] | None = None,
) -> StageEvent:
    """The final event of a stage from its task's output (`reason`: why it ran)."""
    if isinstance(output, Failed):
        return StageEvent(
            stage,
            "failed",
            at,
            duration,
            error=output.error,
            traceback=output.traceback,
            reason=reason,
        )
    if isinstance(output, Skipped):
        return StageEvent(stage, "skipped", at, duration, reason=f"'{output.because}' failed")
    return StageEvent(stage, "done", at, duration, output=output, reason=reason, meta=meta or {})


def scheduler_get(scheduler: str) -> Callable[..., Any]:
    """The `get` function of a local Dask scheduler."""
    if scheduler == "sync":
        from dask.local import get_sync

        return get_sync
    if scheduler == "threads":
        from dask.threaded import get

        return get
    if scheduler == "processes":
        from dask.multiprocessing import get

        return get
    raise ValueError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}")


def compute(
    dsk: dict[str, Any],
    keys: list[str],
    *,
    scheduler: str = "threads",
    num_workers: int | None = None,
    timer: StageTimer | None = None,
) -> dict[str, Any]:
    """Compute `keys` of `dsk` on a local Dask scheduler.

    The graph goes straight to the scheduler's `get`: `dask.compute` on a Delayed would
    convert and order the whole graph a second time (measured: 2x slower at 10k stages).
    """
    kwargs: dict[str, Any] = {}
    if num_workers and scheduler in ("threads", "processes"):
        kwargs["num_workers"] = num_workers
    if scheduler == "processes":
        kwargs["chunksize"] = 1  # Dask batches 6 tasks per process by default: no parallel stages
    if timer is not None:
        kwargs["callbacks"] = [timer.callback()]
    # a list of keys, not one gather task: a task with 100k inputs is slow for Dask to order
    outputs = scheduler_get(scheduler)(dsk, keys, **kwargs)
    return dict(zip(keys, outputs, strict=True))

"""Compute a compiled graph on a Dask scheduler and tell observers what happens.

`execute()` is the one emitter of stage events: `run_started`, `pending` for every
planned stage, `cached` for stages taken from the cache, `running` and the outcome of
computed stages (from Dask's scheduler callbacks, which run in the driver for the sync,
threads and processes schedulers), then `run_finished` with the `RunResult`, or
`run_interrupted`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.events import Observer, Observers, RunInfo, StageEvent
from ..core.result import RunResult
from ..core.states import State
from ..errors import StageError, where
from .compile import Failed, Skipped

SCHEDULERS = ("sync", "threads", "processes")


@dataclass(frozen=True, slots=True)
class CachedStage:
    """A stage taken from the cache: why, its output when loaded (else `load` reads it on
    first access after the run), and facts for observers (cache key, manifest)."""

    reason: str
    output: Any = None
    loaded: bool = False
    load: Callable[[], Any] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


def execute(
    run: RunInfo,
    dsk: dict[str, Any],
    computed: list[str],
    observer: Observers,
    *,
    cached: Mapping[str, CachedStage] | None = None,
    reasons: Mapping[str, str] | None = None,
    meta: Mapping[str, Mapping[str, Any]] | None = None,
    num_workers: int | None = None,
) -> RunResult:
    """Run `computed` stages of `dsk` (the others of `run.stages` come from `cached`)."""
    cached = cached or {}
    observer.run_started(run)
    if observer:
        now = time.perf_counter()
        for name in run.stages:
            observer.stage_changed(StageEvent(name, "pending", now))
        for name in run.stages:
            hit = cached.get(name)
            if hit is not None:
                output = hit.output if hit.loaded else None
                event = StageEvent(
                    name, "cached", now, output=output, reason=hit.reason, meta=hit.meta
                )
                observer.stage_changed(event)
    timer = StageTimer(dict.fromkeys(computed), observer, reasons=reasons, meta=meta)
    try:
        outputs = (
            compute(dsk, computed, scheduler=run.executor, num_workers=num_workers, timer=timer)
            if computed
            else {}
        )
    except BaseException as exc:
        observer.run_interrupted(run, exc)
        raise
    result = outcome(run, outputs, timer.durations, cached, reasons or {})
    observer.run_finished(run, result)
    return result


def outcome(
    run: RunInfo,
    outputs: Mapping[str, Any],
    durations: Mapping[str, float],
    cached: Mapping[str, CachedStage],
    reasons: Mapping[str, str],
) -> RunResult:
    """The RunResult of a run: computed outputs, cached ones (loaded or lazy), errors."""
    values: dict[str, Any] = {}
    status: dict[str, State] = {}
    errors: dict[str, StageError] = {}
    why: dict[str, str] = {name: hit.reason for name, hit in cached.items()}
    why.update(reasons)
    lazy: dict[str, Callable[[], Any]] = {}
    for name in run.stages:
        hit = cached.get(name)
        if hit is not None:
            status[name] = "cached"
            if hit.loaded:
                values[name] = hit.output
            elif hit.load is not None:
                lazy[name] = hit.load
            continue
        output = outputs[name]
        if isinstance(output, Failed):
            status[name] = "failed"
            errors[name] = stage_error(run.name, output)
        elif isinstance(output, Skipped):
            status[name] = "skipped"
            why[name] = f"upstream stage '{output.because}' failed"
        else:
            status[name] = "done"
            values[name] = output
    result = RunResult(
        run.name, values, status, durations, errors, run.run_id, reasons=why, lazy=lazy
    )
    for error in errors.values():
        error.result = result
    return result


def stage_error(pipeline: str, failed: Failed) -> StageError:
    """A StageError naming the stage and its original exception."""
    if isinstance(failed.error, StageError):
        return failed.error
    tries = f" (after {failed.attempts} attempts)" if failed.attempts > 1 else ""
    error = StageError(
        f"{where(pipeline, failed.stage)} failed{tries}: "
        f"{type(failed.error).__name__}: {failed.error}",
        pipeline=pipeline,
        stage=failed.stage,
        cause=failed.error,
        traceback=failed.traceback,
    )
    error.__cause__ = failed.error
    return error


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

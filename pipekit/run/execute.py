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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..core.events import Observer, Observers, RunInfo, StageEvent
from ..core.result import RunResult
from ..core.states import State
from ..errors import Interrupted, StageError, WorkerDiedError, where
from .compile import Attempts, Failed, Portable, Skipped, attempt_log
from .signals import end_as_asked, sigterm_interrupts

SCHEDULERS = ("sync", "threads", "processes")  # local; "distributed": run/distributed.py


@dataclass(frozen=True, slots=True)
class CachedStage:
    """A stage taken from the cache: why, its output when loaded (else `load` reads it on
    first access after the run), and facts for observers (cache key, manifest)."""

    reason: str
    output: Any = None
    loaded: bool = False
    load: Callable[[], Any] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: the metrics stored with the entry: `RunResult.metrics()` never unpickles for them
    metrics: Callable[[], Mapping[str, Any]] | None = None


class Phase(NamedTuple):
    """More of the same run, planned once earlier phases computed (the cache's early
    cutoff): a graph whose upstream outputs are `Value` tasks, the stages it computes, the
    stages it takes from the cache, and reasons (new ones, or updates of earlier ones)."""

    dsk: dict[str, Any]
    computed: list[str]
    cached: Mapping[str, CachedStage]
    reasons: Mapping[str, str]
    meta: Mapping[str, Mapping[str, Any]]


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
    then: Callable[[Mapping[str, Any]], Phase | None] | None = None,
) -> RunResult:
    """Run `computed` stages of `dsk` (the others of `run.stages` come from `cached`).

    `then(outputs so far)` plans the next phase of the run (None: no more), until the
    planned stages are decided: one run, one `run_started`/`run_finished`, stages of later
    phases stay `pending` until they are cached or run.

    An interrupt (Ctrl-C, SIGTERM: `KeyboardInterrupt`) or a dead worker process stops the
    run: running stages are abandoned (threads) or their processes terminated, observers
    get `run_interrupted`, and the exception goes on to the caller.
    """
    cached = dict(cached or {})
    reasons = dict(reasons or {})
    timer = StageTimer(dict.fromkeys(computed), observer, reasons=reasons, meta=meta)
    with sigterm_interrupts() as own_sigterm, _cluster(run, computed):
        try:
            observer.run_started(run)
            if observer:
                _announce(run, observer, cached)
            outputs = (
                compute(
                    dsk,
                    computed,
                    scheduler=run.executor,
                    num_workers=num_workers,
                    timer=timer,
                    pipeline=run.name,
                    spec=run.spec,  # executor=distributed: its section, stage resources
                )
                if computed
                else {}
            )
            while then is not None and (more := then(outputs)) is not None:
                cached.update(more.cached)
                reasons.update(more.reasons)
                timer.stages = dict.fromkeys(more.computed)  # not the Value tasks of earlier
                timer.reasons, timer.meta = reasons, {**timer.meta, **more.meta}
                if observer:
                    _announce_cached(more.cached, observer)
                if more.computed:
                    outputs = {
                        **outputs,
                        **compute(
                            more.dsk,
                            more.computed,
                            scheduler=run.executor,
                            num_workers=num_workers,
                            timer=timer,
                            pipeline=run.name,
                            spec=run.spec,
                        ),
                    }
            result = outcome(run, outputs, timer.durations, cached, reasons)
            observer.run_finished(run, result)
        except BaseException as exc:
            if isinstance(exc, Interrupted):
                exc.stopped = tuple(timer.running())
            observer.run_interrupted(run, exc)
            if own_sigterm:
                end_as_asked(exc)
            raise
    return result


def _cluster(run: RunInfo, computed: list[str]) -> AbstractContextManager[Any]:
    """executor=distributed: the run's cluster, connected (or started) before the run is
    announced, so an unusable cluster stops it with nothing begun (run/distributed.py)."""
    if run.executor != "distributed" or not computed:
        return nullcontext()
    from .distributed import session

    return session(run.spec, computed)


def _announce_cached(cached: Mapping[str, CachedStage], observer: Observer) -> None:
    """`cached` events for stages a later phase took from the cache."""
    now = time.perf_counter()
    for name, hit in cached.items():
        output = hit.output if hit.loaded else None
        event = StageEvent(name, "cached", now, output=output, reason=hit.reason, meta=hit.meta)
        observer.stage_changed(event)


def _announce(run: RunInfo, observer: Observer, cached: Mapping[str, CachedStage]) -> None:
    """`pending` for every planned stage, then `cached` for those taken from the cache."""
    now = time.perf_counter()
    for name in run.stages:
        observer.stage_changed(StageEvent(name, "pending", now))
    for name in run.stages:
        hit = cached.get(name)
        if hit is not None:
            output = hit.output if hit.loaded else None
            event = StageEvent(name, "cached", now, output=output, reason=hit.reason, meta=hit.meta)
            observer.stage_changed(event)


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
    stored: dict[str, Callable[[], Mapping[str, Any]]] = {}
    for name in run.stages:
        hit = cached.get(name)
        if hit is not None:
            status[name] = "cached"
            if hit.loaded:
                values[name] = hit.output
            elif hit.load is not None:
                lazy[name] = hit.load
                if hit.metrics is not None:
                    stored[name] = hit.metrics
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
        run.name,
        values,
        status,
        durations,
        errors,
        run.run_id,
        reasons=why,
        lazy=lazy,
        stored_metrics=stored,
    )
    for error in errors.values():
        error.result = result
    return result


def stage_error(pipeline: str, failed: Failed) -> StageError:
    """A StageError naming the stage and its original exception."""
    if isinstance(failed.error, StageError):
        return failed.error
    tries = f" (after {failed.attempts} attempts)" if failed.attempts > 1 else ""
    cause = f"{type(failed.error).__name__}: {failed.error}"
    if isinstance(failed.error, SystemExit):  # `code` may not survive a trip between processes
        args = failed.error.args
        code = args[0] if len(args) == 1 else (args or failed.error.code)
        cause = f"SystemExit: {code} (a stage must not exit the process)"
    error = StageError(
        f"{where(pipeline, failed.stage)} failed{tries}: {cause}",
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
        #: the graph being computed: its stage tasks hold the attempt logs' token
        self.tasks: Mapping[str, Any] = {}

    def running(self) -> list[str]:
        """Stages started and not yet finished."""
        return [name for name in self.started if name not in self.durations]

    def begin(self, key: str, meta: Mapping[str, Any] | None = None) -> None:
        """A stage started on a cluster worker (executor=distributed reports it here)."""
        if key in self.stages:
            now = self.started[key] = time.perf_counter()
            if self.observer is not None:
                reason = self.reasons.get(key, "")
                event = StageEvent(key, "running", now, reason=reason, meta=meta or {})
                self.observer.stage_changed(event)

    def end(self, key: str, output: Any, log: Attempts | None = None) -> None:
        """A stage's output reached the client (executor=distributed reports it here, with
        the attempt log the worker sent back when the stage passed after retries)."""
        if key in self.stages:
            now = time.perf_counter()
            duration = self.durations[key] = now - self.started.get(key, now)
            log = log if log is not None else self._attempts(key)
            if self.observer is not None:
                event = outcome_event(
                    key, output, now, duration, self.reasons.get(key, ""), self.meta.get(key), log
                )
                self.observer.stage_changed(event)

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
            log = self._attempts(key)
            if self.observer is not None:
                event = outcome_event(
                    key, result, now, duration, self.reasons.get(key, ""), self.meta.get(key), log
                )
                self.observer.stage_changed(event)

    def _attempts(self, key: str) -> Attempts | None:
        """The attempt log a stage that passed after retries left (always popped)."""
        task = self.tasks.get(key)
        return attempt_log(task[0], key) if isinstance(task, tuple) and task else None


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
    log: Attempts | None = None,
) -> StageEvent:
    """The final event of a stage from its task's output (`reason`: why it ran; `log`: the
    attempts of a stage that passed after failing)."""
    if isinstance(output, Failed):
        tries = {"attempt": max(output.attempts, 1), "attempts": max(output.allowed, 1)}
        return StageEvent(
            stage,
            "failed",
            at,
            duration,
            error=output.error,
            traceback=output.traceback,
            reason=reason,
            meta={"attempt_errors": list(output.errors)} if output.allowed > 1 else {},
            **tries,
        )
    if isinstance(output, Skipped):
        return StageEvent(stage, "skipped", at, duration, reason=f"'{output.because}' failed")
    meta = dict(meta or {})
    if log is None:
        return StageEvent(stage, "done", at, duration, output=output, reason=reason, meta=meta)
    meta["attempt_errors"] = list(log.errors)
    return StageEvent(
        stage,
        "done",
        at,
        duration,
        output=output,
        reason=reason,
        meta=meta,
        attempt=log.attempt,
        attempts=log.allowed,
    )


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
    pipeline: str | None = None,
    spec: Any = None,
) -> dict[str, Any]:
    """Compute `keys` of `dsk` on a local Dask scheduler, in a pool this run owns.

    The graph goes straight to the scheduler's `get`: `dask.compute` on a Delayed would
    convert and order the whole graph a second time (measured: 2x slower at 10k stages).
    The pool is ours (`pools`), so an interrupt can abandon its threads or terminate its
    processes; Dask's pools would keep the process alive, or outlive it.
    """
    if timer is not None:
        timer.tasks = dsk  # its stage tasks name their attempt logs (retries)
    if scheduler == "distributed":  # a Dask cluster; events via timer.begin/end
        from .distributed import compute_on_cluster

        return compute_on_cluster(dsk, keys, spec=spec, timer=timer)
    kwargs: dict[str, Any] = {}
    if timer is not None:
        kwargs["callbacks"] = [timer.callback()]
    get = scheduler_get(scheduler)
    if scheduler == "sync":
        return dict(zip(keys, get(dsk, keys, **kwargs), strict=True))
    from dask.system import CPU_COUNT

    from .pools import DaemonThreadPool, process_pool, terminate

    workers = num_workers or CPU_COUNT
    if scheduler == "threads":
        threads = DaemonThreadPool(workers)
        try:
            # a list of keys, not one gather task: a task with 100k inputs is slow to order
            outputs = get(dsk, keys, pool=threads, **kwargs)
        finally:
            threads.shutdown(wait=False)  # idle threads end; a stage that hangs is abandoned
        return dict(zip(keys, outputs, strict=True))
    from concurrent.futures.process import BrokenProcessPool

    kwargs["chunksize"] = 1  # Dask batches 6 tasks per process by default: no parallel stages
    dsk = dict(dsk)
    for key in keys:  # an output that cannot be pickled fails its stage only
        task = dsk[key]
        if isinstance(task, tuple) and task and callable(task[0]):
            dsk[key] = (Portable(pipeline or "", key, task[0]), *task[1:])
    processes = process_pool(workers)
    try:
        outputs = get(dsk, keys, pool=processes, **kwargs)
    except BrokenProcessPool as exc:
        terminate(processes)
        raise _worker_died(pipeline, timer.running() if timer is not None else []) from exc
    except BaseException:
        terminate(processes)
        raise
    processes.shutdown(wait=True)
    return dict(zip(keys, outputs, strict=True))


def _worker_died(pipeline: str | None, running: list[str]) -> WorkerDiedError:
    """The error for a broken process pool, naming the stage(s) that were running."""
    died = "a worker process died (os._exit, a crash, or the OOM killer)"
    if len(running) == 1:
        message = f"{where(pipeline, running[0])} failed: its worker process died"
        message += " (os._exit, a crash, or the OOM killer); the run stopped"
    else:
        names = ", ".join(f"'{name}'" for name in running) or "none"
        message = f"{where(pipeline) or 'run'}: {died} while stages ran: {names}; the run stopped"
    return WorkerDiedError(
        message, pipeline=pipeline, stage=running[0] if len(running) == 1 else None
    )

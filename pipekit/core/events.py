"""Stage lifecycle events: the one seam between execution and its observers.

The run layer emits `pending -> running -> done | cached | failed | skipped` for each
stage, framed by `run_started` / `run_finished`, and is the only emitter. Tracking,
drawing, widgets and progress displays subclass `Observer`; the executor never imports
them, and observers hand nothing back into the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .graph import Graph
from .result import RunResult
from .spec import PipelineSpec
from .states import FINAL_STATES, STATES, State

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StageEvent:
    """A stage changed state. `output` is set on `done`/`cached`, `error` on `failed`."""

    stage: str
    state: State
    at: float
    duration: float | None = None
    output: Any = None
    error: BaseException | None = None
    traceback: str = ""
    reason: str = ""
    #: extra facts for observers, e.g. {"cache_key": ..., "manifest": {...}} from the cache;
    #: a computed stage's final event after failed attempts has {"attempt_errors": [...]}
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: the attempt that ended the stage, of `attempts` allowed (`retries` + 1)
    attempt: int = 1
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What observers learn when a run starts: the pipeline as plain data, and the plan."""

    spec: PipelineSpec
    graph: Graph
    stages: tuple[str, ...]
    executor: str
    run_id: str
    started: float
    overrides: tuple[str, ...] = ()
    #: the stage cache store of this run, or None when caching is off
    cache: Any = None

    @property
    def name(self) -> str:
        """The pipeline's name."""
        return self.spec.name


class Observer:
    """Subclass and override what you need; every hook defaults to doing nothing."""

    #: False when the observer never reads `StageEvent.output`: then a run need not load
    #: cached stage outputs from the store just to put them into `cached` events.
    wants_outputs: bool = True

    def run_started(self, run: RunInfo) -> None:
        """Called once before any stage runs."""

    def stage_changed(self, event: StageEvent) -> None:
        """Called in the driver process, in order, for every stage state change."""

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        """Called once after the last stage, also when stages failed."""

    def run_interrupted(self, run: RunInfo, error: BaseException) -> None:
        """Called when the run stops abnormally (Ctrl-C, scheduler error)."""


class Observers(Observer):
    """Fans events out to many observers; one faulty observer never breaks a run."""

    def __init__(self, observers: Iterable[Observer] = ()):
        self._observers = [o for o in observers if o is not None]

    def __bool__(self) -> bool:
        return bool(self._observers)

    @property
    def wants_outputs(self) -> bool:  # type: ignore[override]
        return any(getattr(o, "wants_outputs", True) for o in self._observers)

    def _each(self, hook: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:  # an observer bug must not kill the user's pipeline
                log.exception("pipekit observer %r failed in %s", observer, hook)

    def run_started(self, run: RunInfo) -> None:
        self._each("run_started", run)

    def stage_changed(self, event: StageEvent) -> None:
        self._each("stage_changed", event)

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        self._each("run_finished", run, result)

    def run_interrupted(self, run: RunInfo, error: BaseException) -> None:
        self._each("run_interrupted", run, error)


class StatusBoard(Observer):
    """Keeps the latest state and timing of every stage: the model behind live displays."""

    wants_outputs = False

    def __init__(self) -> None:
        self.state: dict[str, State] = {}
        self.started: dict[str, float] = {}
        self.duration: dict[str, float] = {}
        self.reason: dict[str, str] = {}
        self.run: RunInfo | None = None

    def run_started(self, run: RunInfo) -> None:
        self.run = run
        self.state = dict.fromkeys(run.stages, "pending")
        self.started.clear()
        self.duration.clear()
        self.reason.clear()

    def stage_changed(self, event: StageEvent) -> None:
        self.state[event.stage] = event.state
        if event.state == "running":
            self.started[event.stage] = event.at
        if event.duration is not None:
            self.duration[event.stage] = event.duration
        if event.reason:
            self.reason[event.stage] = event.reason

    @property
    def finished(self) -> int:
        """Stages in a final state (done, cached, failed, skipped): a progress bar's value."""
        return sum(state in FINAL_STATES for state in self.state.values())

    def counts(self) -> Mapping[str, int]:
        out = dict.fromkeys(STATES, 0)
        for state in self.state.values():
            out[state] += 1
        return out

    def elapsed(self, stage: str) -> float | None:
        if stage in self.duration:
            return self.duration[stage]
        if stage in self.started:
            return time.perf_counter() - self.started[stage]
        return None

"""`Pipeline`: a validated, runnable pipeline — the object users hold in notebooks."""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError, OverrideError, StageError, where
from .events import Observer, Observers, RunInfo, StageEvent
from .execute import SCHEDULERS, Failed, Skipped, StageTimer, build_graph, compute
from .graph import Graph, check_edges, check_targets
from .result import RunResult
from .spec import TOP_LEVEL_KEYS, PipelineSpec, Stage, interpolated_keys, parse_pipeline


class Pipeline:
    """A pipeline parsed from a composed config; `validate()` then `run()`."""

    def __init__(
        self,
        spec: PipelineSpec,
        *,
        overrides: Sequence[str] = (),
        config_dir: str | Path | None = None,
        config_name: str = "config",
        composed: bool = False,
    ):
        self.spec = spec
        self.composed = composed  # made by Hydra composition (pk.load / the CLI)
        self.overrides = tuple(overrides)
        self.config_dir = config_dir
        self.config_name = config_name
        self._graph: Graph | None = None
        self._funcs: dict[str, Callable[..., Any]] | None = None
        self._tasks: dict[str, tuple] | None = None
        self.last_result: RunResult | None = None

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any, *, overrides: Sequence[str] = (), **kwargs: Any) -> Pipeline:
        """Parse a composed Hydra/OmegaConf config (or a plain mapping) into a Pipeline.

        The config is resolved and converted to plain Python exactly once.
        """
        with bulk_allocation():
            plain, interpolated = _to_plain(cfg)
            spec = parse_pipeline(plain, interpolated=interpolated)
        return cls(spec, overrides=overrides, **kwargs)

    def with_overrides(self, overrides: Iterable[str]) -> Pipeline:
        """The same pipeline with more overrides; a key set again replaces its old value.

        Pipelines from `pk.load` are composed again by Hydra (so group swaps work);
        others get `key=value` overrides applied to their config.
        """
        from .config import load, merge_overrides

        merged = merge_overrides(self.overrides, list(overrides))
        if self.composed:
            return load(
                None, overrides=merged, config_dir=self.config_dir, config_name=self.config_name
            )
        return _apply_overrides(self.spec.config, merged)

    # --- inspection ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stages(self) -> Mapping[str, Stage]:
        return self.spec.stages

    @property
    def config(self) -> Mapping[str, Any]:
        """The resolved config as plain Python values."""
        return self.spec.config

    @property
    def graph(self) -> Graph:
        return self.validate()._graph  # type: ignore[return-value]

    def validate(self) -> Pipeline:
        """Check edges, cycles, targets and signatures; raise a ConfigError naming the fault."""
        if self._graph is None:
            from .targets import resolve_all

            with bulk_allocation():
                graph = check_edges(self.spec)
                graph.order()
                self._funcs = resolve_all(self.spec)
            self._graph = graph
        return self

    def plan(self, targets: Iterable[str] | None = None) -> list[str]:
        """The stages a run of `targets` executes, in topological order."""
        graph = self.graph
        order = graph.order()
        if not targets:
            return order
        needed = graph.upstream(check_targets(self.spec, targets))
        return [name for name in order if name in needed]

    def tasks(self, stages: Sequence[str] | None = None) -> dict[str, tuple]:
        """Dask tasks of `stages` (all by default), compiled once per pipeline and reused."""
        if self._tasks is None:
            order = self.graph.order()
            with bulk_allocation():
                self._tasks = build_graph(self.spec, self._funcs or {}, order)
        if stages is None or len(stages) == len(self._tasks):
            return dict(self._tasks)
        return {name: self._tasks[name] for name in stages}

    def to_delayed(self, targets: Iterable[str] | None = None) -> Any:
        """The run as one `dask.delayed.Delayed` yielding a tuple of the planned outputs."""
        from dask.delayed import Delayed

        from .execute import GATHER_KEY, _gather

        stages = self.plan(targets)
        dsk = self.tasks(stages)
        dsk[GATHER_KEY] = (_gather, *stages)
        return Delayed(GATHER_KEY, dsk)

    # --- running ------------------------------------------------------------------------

    def run(
        self,
        targets: Iterable[str] | None = None,
        executor: str | None = None,
        *,
        observers: Iterable[Observer] = (),
        progress: bool | str = "auto",
        raise_on_failure: bool = True,
    ) -> RunResult:
        """Run the stages `targets` need (all by default) and return their outputs.

        Raises StageError for the first failed stage (its `.result` holds the partial
        RunResult) unless `raise_on_failure=False`. Independent branches finish anyway.
        """
        stages = self.plan(targets)
        settings = self.spec.section("executor")
        scheduler = executor or settings.get("scheduler", "threads")
        if scheduler not in SCHEDULERS:
            raise ConfigError(
                f"{where(self.name, key='executor')} '{scheduler}' is unknown; use one of "
                f"{', '.join(SCHEDULERS)}"
            )
        observer = Observers(
            [*self._configured_observers(), *_progress_display(self, progress), *observers]
        )
        run = RunInfo(
            pipeline=self,
            stages=tuple(stages),
            executor=scheduler,
            run_id=uuid.uuid4().hex,
            started=time.time(),
            overrides=self.overrides,
        )
        observer.run_started(run)
        if observer:
            now = time.perf_counter()
            for name in stages:
                observer.stage_changed(StageEvent(name, "pending", now))
        dsk = self.tasks(stages)
        timer = StageTimer(dsk, observer)
        try:
            outputs = compute(
                dsk,
                stages,
                scheduler=scheduler,
                num_workers=settings.get("num_workers"),
                timer=timer,
            )
        except BaseException as exc:
            observer.run_interrupted(run, exc)
            raise
        result = self._result(run, outputs, timer.durations)
        self.last_result = result
        observer.run_finished(run, result)
        if result.errors and raise_on_failure:
            error = result.errors[result.failed[0]]
            raise error
        return result

    def _result(
        self, run: RunInfo, outputs: Mapping[str, Any], durations: Mapping[str, float]
    ) -> RunResult:
        values, status, errors, reasons = {}, {}, {}, {}
        for name, output in outputs.items():
            if isinstance(output, Failed):
                status[name] = "failed"
                errors[name] = stage_error(self.name, output)
            elif isinstance(output, Skipped):
                status[name] = "skipped"
                reasons[name] = f"upstream stage '{output.because}' failed"
            else:
                status[name] = "done"
                values[name] = output
        result = RunResult(
            self.name, values, status, durations, errors, run.run_id, reasons=reasons
        )
        for error in errors.values():
            error.result = result
        return result

    def _configured_observers(self) -> list[Observer]:
        """Observers the config asks for (tracking), imported only when enabled."""
        tracking = self.spec.section("tracking")
        if tracking and tracking.get("enabled", True) and tracking.get("backend", "off") != "off":
            from .tracking import observer_from_config

            observer = observer_from_config(self, tracking)
            return [observer] if observer is not None else []
        return []

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {len(self.stages)} stages>"


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


def _progress_display(pipeline: Pipeline, progress: bool | str) -> list[Observer]:
    if progress is False:
        return []
    from .progress import auto_display

    display = auto_display(pipeline, force=progress is True)
    return [display] if display is not None else []


@contextmanager
def bulk_allocation() -> Iterator[None]:
    """Pause the cyclic GC while building many small acyclic objects (specs, task graphs).

    Its collections rescan every live object: measured 30-40% of parse time at 100k stages.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> Pipeline:
    """Apply `key=value` / `~key` overrides to a plain config (pipelines not made by Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.create(dict(config))
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:
        from .config import describe_hydra_error

        raise OverrideError(describe_hydra_error(exc)) from exc
    with open_dict(cfg):
        for override in parsed:
            key = override.key_or_group
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is not None and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    return Pipeline.from_config(cfg, overrides=overrides)


def _to_plain(cfg: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """Resolve a DictConfig once into plain Python, mapping OmegaConf errors to ConfigError."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(cfg, DictConfig):
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(cfg).__name__}")
        cfg = OmegaConf.create(dict(cfg))
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0]
        raise ConfigError(
            f"config{f' key {key!r}' if key else ''}: {message}; fix the value or pass "
            f"it as an override, e.g. {key or 'key'}=..."
        ) from exc
    unknown = set(plain) - TOP_LEVEL_KEYS
    interpolated = (
        interpolated_keys(OmegaConf.to_container(cfg, resolve=False)) if unknown else frozenset()
    )
    return plain, interpolated  # type: ignore[return-value]

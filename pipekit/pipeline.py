"""`Pipeline`: a validated, runnable pipeline — the object users hold in notebooks."""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, OverrideError, StageError, where
from .events import Observer, Observers, RunInfo, StageEvent
from .execute import SCHEDULERS, Failed, Skipped, StageTimer, build_graph, compute
from .graph import Graph, check_edges, check_targets
from .result import RunResult
from .spec import (
    TOP_LEVEL_KEYS,
    PipelineSpec,
    Stage,
    backend_name,
    interpolated_keys,
    parse_pipeline,
)

if TYPE_CHECKING:
    from .cache import CacheStore, Plan, Planner, StagePlan


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
        self._cache_parts: dict[str, str] | None = None
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

    # --- caching ------------------------------------------------------------------------

    def cache_store(self) -> CacheStore | None:
        """The stage cache the `cache` config section selects, or None when it is off."""
        from .cache import open_store

        return open_store(self.spec.section("cache"), pipeline=self.name)

    def explain(
        self, targets: Iterable[str] | None = None, force: bool | Iterable[str] | None = None
    ) -> Plan:
        """What a run would compute or take from the cache, and why; runs nothing.

        E.g. `train  run  params changed: C 1.0 → 0.5`, `evaluate  run  upstream changed: train`.
        """
        from .cache import Plan, Planner

        stages = self.plan(targets)
        store = self.cache_store()
        planner = Planner(self, store)
        plans = planner.decide(stages, force=self._forced(force), manifests=True, running=False)
        return Plan(self.name, [plans[s] for s in stages], store.display if store else None)

    def _forced(self, force: bool | Iterable[str] | None) -> bool | list[str]:
        if force is None or force is False:
            return []
        if force is True:
            return True
        names = [force] if isinstance(force, str) else list(force)
        return check_targets(self.spec, names)

    def _cache_static(self) -> dict[str, str]:
        """The fixed part of each stage's cache key, kept for this Pipeline's re-runs."""
        if self._cache_parts is None:
            from .cache import static_key_parts

            self._cache_parts = static_key_parts(self)
        return self._cache_parts

    # --- running ------------------------------------------------------------------------

    def run(
        self,
        targets: Iterable[str] | None = None,
        executor: str | None = None,
        *,
        observers: Iterable[Observer] = (),
        progress: bool | str = "auto",
        raise_on_failure: bool = True,
        force: bool | Iterable[str] | None = None,
    ) -> RunResult:
        """Run the stages `targets` need (all by default) and return their outputs.

        With a cache configured, stages whose key has an entry are not computed (status
        `cached`); `force=True` or `force=["train"]` recomputes (and what depends on it).
        Raises StageError for the first failed stage (its `.result` holds the partial
        RunResult) unless `raise_on_failure=False`. Independent branches finish anyway.
        """
        stages = self.plan(targets)
        forced = self._forced(force)
        store = self.cache_store()
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
        plans = planner = None
        if store is not None:
            from .cache import Planner

            planner = Planner(self, store)
            plans = planner.decide(stages, force=forced, manifests=bool(observer))
        run = RunInfo(
            pipeline=self,
            stages=tuple(stages),
            executor=scheduler,
            run_id=uuid.uuid4().hex,
            started=time.time(),
            overrides=self.overrides,
            cache=store,
        )
        observer.run_started(run)
        if observer:
            now = time.perf_counter()
            for name in stages:
                observer.stage_changed(StageEvent(name, "pending", now))
        try:
            if plans is None:
                dsk, computed, loaded = self.tasks(stages), stages, {}
                timer = StageTimer(dsk, observer)
            else:
                dsk, computed, loaded, timer = self._cached_graph(stages, plans, planner, observer)
            outputs = (
                compute(
                    dsk,
                    computed,
                    scheduler=scheduler,
                    num_workers=settings.get("num_workers"),
                    timer=timer,
                )
                if computed
                else {}
            )
        except BaseException as exc:
            observer.run_interrupted(run, exc)
            raise
        result = self._result(run, outputs, timer.durations, plans, loaded, store)
        self.last_result = result
        observer.run_finished(run, result)
        if result.errors and raise_on_failure:
            error = result.errors[result.failed[0]]
            raise error
        return result

    def _cached_graph(
        self,
        stages: list[str],
        plans: dict[str, StagePlan],
        planner: Planner,
        observer: Observers,
    ) -> tuple[dict[str, Any], list[str], dict[str, Any], StageTimer]:
        """The graph of the stages to compute, after loading the cached outputs they need.

        Loads run in the driver, newest stage first: an entry that turns out corrupt is
        recomputed instead (with a warning), which may need its own upstream outputs.
        Cached outputs nobody needs stay on disk unless an observer wants them.
        """
        from .cache import REPLACED, StagePlan, StoreTask, Value
        from .errors import CacheEntryError

        store = planner.store
        assert store is not None
        spec = self.stages
        cached = {s for s in stages if plans[s].action == "cached"}
        if observer.wants_outputs:
            needed = set(cached)
        else:
            needed = {d for s in stages if s not in cached for d in spec[s].upstream} & cached
        loaded: dict[str, Any] = {}
        for name in reversed(stages):
            if name not in needed or name not in cached:
                continue
            plan = plans[name]
            try:
                loaded[name] = planner.load(plan)
            except CacheEntryError:
                plans[name] = StagePlan(name, "run", REPLACED, plan.key)
                cached.discard(name)
                needed.update(d for d in spec[name].upstream if d in cached)
        now = time.perf_counter()
        for name in stages if observer else ():
            plan = plans[name]
            if plan.action == "cached":
                meta = {"cache_key": plan.key, "manifest": plan.manifest or {}}
                observer.stage_changed(
                    StageEvent(
                        name, "cached", now, output=loaded.get(name), reason=plan.reason, meta=meta
                    )
                )
        computed = [s for s in stages if plans[s].action == "run"]
        dsk = self.tasks(computed)
        meta: dict[str, dict[str, Any]] = {}
        if computed:
            for name in computed:
                if spec[name].cache:
                    task, key = dsk[name], planner.keys[name]
                    dsk[name] = (StoreTask(task[0], store, key, planner.info(name)), *task[1:])
                    meta[name] = {"cache_key": key}
            for name, value in loaded.items():
                dsk[name] = (Value(value),)
        reasons = {s: plans[s].reason for s in computed}
        timer = StageTimer(dict.fromkeys(computed), observer, reasons=reasons, meta=meta)
        return dsk, computed, loaded, timer

    def _result(
        self,
        run: RunInfo,
        outputs: Mapping[str, Any],
        durations: Mapping[str, float],
        plans: Mapping[str, StagePlan] | None = None,
        loaded: Mapping[str, Any] | None = None,
        store: CacheStore | None = None,
    ) -> RunResult:
        values, status, errors, reasons = {}, {}, {}, {}
        lazy = {}
        if plans is not None:  # status in plan order, then the computed stages' fates
            loaded = loaded or {}
            load = self._load_later
            status = dict.fromkeys(run.stages, "cached")
            reasons = {name: plan.reason for name, plan in plans.items()}
            for name in run.stages:
                if name in outputs:
                    continue
                if name in loaded:
                    values[name] = loaded[name]
                else:
                    lazy[name] = partial(load, store, plans[name])
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
            self.name, values, status, durations, errors, run.run_id, reasons=reasons, lazy=lazy
        )
        for error in errors.values():
            error.result = result
        return result

    def _load_later(self, store: CacheStore, plan: StagePlan) -> Any:
        """A cached output first read after the run; a corrupt entry is recomputed."""
        from .cache import Planner
        from .errors import CacheEntryError

        try:
            return Planner(self, store).load(plan)
        except CacheEntryError:
            return self.run(targets=[plan.stage], progress=False)[plan.stage]

    def _configured_observers(self) -> list[Observer]:
        """Observers the config asks for (tracking), imported only when enabled."""
        tracking = self.spec.section("tracking")
        if tracking and tracking.get("enabled", True) and backend_name(tracking, "off") != "off":
            from .tracking import observer_from_config

            observer = observer_from_config(self, tracking)
            return [observer] if observer is not None else []
        return []

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {len(self.stages)} stages>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """Jupyter draws the DAG (SVG); without Graphviz's `dot` it shows the DOT text."""
        from .viz import mimebundle

        return mimebundle(self, include, exclude)


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

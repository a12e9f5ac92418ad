"""`Pipeline`: a validated, runnable pipeline — the object users hold in notebooks."""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import command_line, composed, merge_overrides, override_key
from .core.events import Observer, Observers, RunInfo
from .core.graph import Graph, check_edges, check_targets
from .core.result import RunResult
from .core.sections import check_sections, check_value, checked
from .core.spec import (
    TOP_LEVEL_KEYS,
    PipelineSpec,
    Stage,
    backend_name,
    interpolated_keys,
    parse_pipeline,
)
from .errors import ConfigError, Interrupted, OverrideError
from .runlock import check_concurrency, locked

if TYPE_CHECKING:
    from .cache.plan import Plan, Planner
    from .cache.store import CacheStore
    from .tracking.observer import MlflowObserver


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
        source: str | Path | None = None,
    ):
        self.spec = spec
        self.composed = composed  # made by Hydra composition (pk.load / the CLI)
        self.overrides = tuple(overrides)
        self.config_dir = config_dir
        self.config_name = config_name
        #: the YAML file the pipeline was declared in, when composed from one
        self.source = Path(source) if source else None
        self._graph: Graph | None = None
        self._funcs: dict[str, Callable[..., Any]] | None = None
        self._tasks: dict[str, tuple] | None = None
        self._static_keys: dict[str, str] | None = None
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
        """Check the sections (executor, cache, tracking), edges, cycles, targets and
        signatures; raise a ConfigError naming the fault."""
        if self._graph is None:
            from .core.promotion import check_promotion
            from .core.serving import check_serve
            from .core.targets import resolve_all
            from .export.schedule import check_schedule

            check_sections(self.name, self.spec.config)
            check_schedule(self.spec)
            check_concurrency(self.spec)
            with bulk_allocation():
                graph = check_edges(self.spec)
                graph.order()
                self._funcs = resolve_all(self.spec)
            check_serve(self.spec)  # the `serve` section's inference DAG (core.serving)
            check_promotion(self.spec, graph)  # a `promote` that can never act (core.promotion)
            self._graph = graph
        return self

    def plan(self, targets: Iterable[str] | str | None = None) -> list[str]:
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
                from .run.compile import build_graph

                self._tasks = build_graph(self.spec, self._funcs or {}, order)
        if stages is None or len(stages) == len(self._tasks):
            return dict(self._tasks)
        return {name: self._tasks[name] for name in stages}

    def to_delayed(self, targets: Iterable[str] | str | None = None) -> Any:
        """The run as one `dask.delayed.Delayed` yielding a tuple of the planned outputs."""
        from dask.delayed import Delayed

        stages = self.plan(targets)
        dsk = self.tasks(stages)
        from .run.compile import GATHER_KEY, gather

        dsk[GATHER_KEY] = (gather, *stages)
        return Delayed(GATHER_KEY, dsk)

    def command_line(self, command: str = "run", overrides: Sequence[str] = ()) -> str | None:
        """The `pipekit <command>` line that composes this pipeline (plus `overrides`), as it
        runs when pasted; None for a pipeline built from a mapping (no file composes it)."""
        if not self.composed:
            return None
        merged = merge_overrides(self.overrides, list(overrides))
        chosen = self.source.stem if self.source and self.source.parent.name == "pipeline" else None
        if chosen and not any(override_key(o) == "pipeline" for o in merged):
            merged.insert(0, f"pipeline={chosen}")  # the file's name, not the `name:` key
        return command_line(
            command, merged, config_dir=self.config_dir, config_name=self.config_name
        )

    # --- caching ------------------------------------------------------------------------

    def cache_store(self) -> CacheStore | None:
        """The stage cache the `cache` config section selects, or None when it is off."""
        from .cache.store import open_store

        return open_store(self.spec.section("cache"), pipeline=self.name)

    def explain(
        self, targets: Iterable[str] | str | None = None, force: bool | Iterable[str] | None = None
    ) -> Plan:
        """What a run would compute or take from the cache, and why; runs nothing.

        E.g. `train  run  params changed: C 1.0 → 0.5`, `evaluate  run  upstream changed: train`.
        """
        from .cache.plan import Plan

        stages = self.plan(targets)
        store = self.cache_store()
        planner = self._planner(store)
        plans = planner.decide(stages, force=self._forced(force), manifests=True, running=False)
        return Plan(self.name, [plans[s] for s in stages], store.display if store else None)

    def _planner(
        self, store: CacheStore | None, run_id: str | None = None, targets: Sequence[str] = ()
    ) -> Planner:
        from .cache.plan import Planner, static_key_parts

        if self._static_keys is None:
            self._static_keys = static_key_parts(self.spec)
        return Planner(
            self.spec,
            self._funcs or {},
            self.graph,
            store,
            self._static_keys,
            run_id=run_id,
            targets=targets,
        )

    def _forced(self, force: bool | Iterable[str] | None) -> bool | list[str]:
        if force is None or force is False:
            return []
        if force is True:
            return True
        return check_targets(self.spec, force)

    # --- running ------------------------------------------------------------------------

    @locked  # one run per pipeline and cache at a time (`concurrency: wait|skip`)
    def run(
        self,
        targets: Iterable[str] | str | None = None,
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
        A run whose tracking failed warns, or with `tracking.on_error=fail` raises
        TrackingFailedError (a TrackingError; `.result` holds the RunResult) after it.
        """
        stages = self.plan(targets)
        forced = self._forced(force)
        settings = checked(self.name, "executor", self.spec.config.get("executor"))
        scheduler = settings["scheduler"]
        if executor:  # this run's choice, checked like the config's, before anything is made
            scheduler = check_value(self.name, "executor", "scheduler", executor)
        store = self.cache_store()
        shared_id = os.environ.get("PIPEKIT_RUN_ID") or None  # set by Airflow tasks
        tracker = self._tracker()
        observer = Observers(
            [tracker, *_progress_display(self.spec, progress), *observers]  # type: ignore[list-item]
        )
        run = RunInfo(
            spec=self.spec,
            graph=self.graph,
            stages=tuple(stages),
            executor=scheduler,
            run_id=shared_id or uuid.uuid4().hex,
            started=time.time(),
            overrides=self.overrides,
            cache=store,
        )
        then = None
        if store is None:
            dsk, computed, cached, reasons, meta = self.tasks(stages), stages, {}, {}, {}
        else:  # in phases: stages after an always-run stage are planned once it ran
            from .cache.plan import Phases

            chosen = check_targets(self.spec, targets) if targets else []
            phases = Phases(  # with a shared run id, always-run upstream stages run once
                self._planner(store, shared_id, chosen),
                stages,
                self.tasks,
                force=forced,
                manifests=bool(observer),
                wants_outputs=observer.wants_outputs,
            )
            dsk, computed, cached, reasons, meta = phases.first()
            then = phases.next
        from .run.execute import execute  # Dask's callbacks and pools: loaded to run

        try:
            result = execute(
                run,
                dsk,
                computed,
                observer,
                cached=cached,
                reasons=reasons,
                meta=meta,
                num_workers=settings["num_workers"],
                then=then,
            )
        except Interrupted as stop:  # say where the (now KILLED) run was tracked
            if tracker is not None:
                stop.tracking = tracker.location()
            raise
        if tracker is not None:
            result.tracking.update(tracker.location())
            result.tracking.update(tracker.failure())  # `tracking_error`, when it failed
            result.tracking.update(self._export_on_promote(result))  # serve.export_on_promote
        self.last_result = result
        if result.errors and raise_on_failure:
            raise result.errors[result.failed[0]]
        if tracker is not None and raise_on_failure:
            tracker.check(result)  # TrackingFailedError when tracking.on_error=fail
        return result

    def _tracker(self) -> MlflowObserver | None:
        """The MLflow observer the `tracking` section asks for, imported only when enabled."""
        tracking = self.spec.section("tracking")
        if tracking and tracking.get("enabled", True) and backend_name(tracking, "off") != "off":
            from .tracking.observer import observer_from_config

            return observer_from_config(self.name, tracking)
        return None

    # --- serving (docs/serving.md) -------------------------------------------------------

    def export(self, target: str = "mlflow", *, alias: bool | str = True) -> Any:
        """Log the `serve` section's inference DAG as one MLflow pyfunc registered as
        `<pipeline>.serving`, pinning one version per model stage, and move `serve.alias`
        to the new version (`alias="x"`: that alias; False: none). Returns the `Exported`."""
        if target != "mlflow":
            raise ConfigError(
                f"pipeline '{self.name}': Pipeline.export target '{target}' is unknown; "
                f"use 'mlflow' (`pipekit export airflow` writes an Airflow DAG)"
            )
        from .core.serving import check_serve
        from .serve.export import export

        self.validate()
        return export(self.spec, check_serve(self.spec), self.graph.order(), alias=alias)

    def _export_on_promote(self, result: RunResult) -> dict[str, str]:
        """With `serve.export_on_promote`, after a run whose promotion fired: export, unless
        the alias already serves the same stage versions; the serving version, for
        `result.tracking`."""
        serve = self.spec.config.get("serve")
        if not isinstance(serve, Mapping) or serve.get("export_on_promote") is not True:
            return {}
        passed = [s for s, st in result.status.items() if st in ("done", "cached")]
        aliases = [self.stages[s].promote for s in passed if self.stages[s].promote]
        if result.errors or not aliases:
            return {}
        from .core.serving import check_serve
        from .serve.export import export

        done = export(
            self.spec,
            check_serve(self.spec),
            self.graph.order(),
            skip_unchanged=True,  # the promotion kept the holder: nothing new to serve
            prefer=aliases[0],  # the stage versions the promotion chose
        )
        return {"serving_version": f"{done.name}/{done.version}"}

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {len(self.stages)} stages>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """Jupyter draws the DAG (SVG); without Graphviz's `dot` it shows the DOT text."""
        from .display.render import mimebundle

        return mimebundle(self.spec, repr(self), include, exclude)


def load(
    name: str | None = None,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
    config_name: str = "config",
) -> Pipeline:
    """Compose `pipeline=<name>` plus overrides and return the Pipeline (not yet run).

    `config_dir` is searched before pipekit's own configs and needs no `config.yaml`.
    """
    selects = any(override_key(o) == "pipeline" for o in overrides)
    extra = [f"pipeline={name}"] if name and not selects else []
    cfg, source = composed([*extra, *overrides], config_dir=config_dir, config_name=config_name)
    return Pipeline.from_config(
        cfg,
        overrides=[*extra, *overrides],
        config_dir=config_dir,
        config_name=config_name,
        composed=True,
        source=source,
    )


def _progress_display(spec: PipelineSpec, progress: bool | str) -> list[Observer]:
    if progress is False:
        return []
    from .display.live import auto_display

    display = auto_display(spec, force=progress is True)
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
    if type(cfg) is dict:  # a plain mapping without interpolations skips OmegaConf
        plain = _plain_copy(cfg)
        if plain is not None:
            return plain, frozenset()
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


_PLAIN_LEAVES = (str, int, float, bool, type(None))


def _plain_copy(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of a plain config as OmegaConf would return it (tuples become lists), or None
    when OmegaConf must see it: an interpolation (`${...}`), a `???` (missing) value, or a
    value that is not plain data. Measured: a 1000-stage DAG converts in ~2% of the time
    an OmegaConf round-trip takes."""
    out: dict[str, Any] = {}
    stack: list[tuple[Any, Any]] = [(cfg, out)]
    while stack:
        source, target = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in items:
            if isinstance(value, str):
                if "${" in value or value == "???":
                    return None
                copy: Any = value
            elif isinstance(value, _PLAIN_LEAVES):
                copy = value
            elif type(value) is dict:
                copy = {}
                stack.append((value, copy))
            elif type(value) in (list, tuple):
                copy = [None] * len(value)
                stack.append((value, copy))
            else:
                return None
            target[key] = copy
    return out

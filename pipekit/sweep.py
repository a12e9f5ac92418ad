"""Sweeps that understand the DAG: every job of a Hydra sweep in ONE merged Dask graph.

`pipekit run -m stages.train.params.C=0.1,1,10` (Hydra's basic launcher) and
`pk.sweep("cancer", {"stages.train.params.C": [0.1, 1, 10]})` come here. Hydra's own
override parser and basic sweeper enumerate the jobs; each job is composed by Hydra as a
single run would be. Then every stage of every job gets its cache key (the planner's
fingerprint: code, params, watched files, upstream keys), and stages whose key is the
same in several jobs become ONE task of the merged graph: ingest and features run once,
only `train` and what follows fan out. Shared stages keep their name (`split`); the
others are named after their job (`train#2`).

Tracking: each job is its own MLflow parent run, tagged `pipekit.sweep_id`. A shared
stage has one nested run, in the first job that has it; later jobs' parent runs link to
it (`pipekit.shared.<stage>` = its run id) and get its params, and their model versions
name the shared upstream versions (`pipekit.upstream.<stage>`), as a single run would.
Each job's MlflowObserver sees its own stages' events (translated from the merged run);
the links are written after the run, from the trackers' run ids, in this process.

The sweep ends with a table: one row per job, the swept values, every metric, and the
best job by `sweep.metric` / `--best evaluate.accuracy` (`sweep.mode`: max or min).

The whole merged sweep holds the pipeline's run lock (`runlock.run_locks`), as one run
of it would: `concurrency: wait` queues it behind a run still going, `skip` makes it do
nothing (RunSkipped; the CLI says so and exits 0), and runs started meanwhile wait or skip.
"""

from __future__ import annotations

import sys
import time
import types
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.events import Observer, Observers, RunInfo, StageEvent
from .core.graph import Graph
from .core.result import RunResult
from .core.sections import check_value, checked
from .core.spec import PipelineSpec
from .core.text import table
from .errors import RunSkipped, SweepError, did_you_mean, where
from .pipeline import Pipeline, _progress_display
from .run.compile import Value
from .run.execute import CachedStage, execute
from .runlock import run_locks

if TYPE_CHECKING:
    from .tracking.observer import MlflowObserver


# --- enumerating jobs (Hydra's parser and basic sweeper) ------------------------------------


def job_overrides(overrides: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """Every job's override list, as Hydra's basic sweeper enumerates them (the cartesian
    product of `key=a,b`, `range()`, `choice()`, `glob()` sweeps), and the swept keys."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import describe_hydra_error

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception as exc:
        raise SweepError(describe_hydra_error(exc)) from exc
    swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
    jobs = [list(job) for batch in batches for job in batch]
    return jobs or [[]], swept


def sweep_overrides(params: Mapping[str, Iterable[Any]] | Sequence[str]) -> list[str]:
    """`{"stages.train.params.C": [0.1, 1]}` -> `["stages.train.params.C=0.1,1"]`; a list
    of override strings is taken as written."""
    if not isinstance(params, Mapping):
        return [str(p) for p in params]
    out = []
    for key, values in params.items():
        if isinstance(values, str) or not isinstance(values, Iterable):
            values = [values]
        shown = [hydra_value(v) for v in values]
        if not shown:
            raise SweepError(f"sweep: '{key}' has no values to sweep over")
        out.append(f"{key}={','.join(shown)}")
    return out


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted, lists and dicts nested)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise SweepError(f"sweep: {value!r} ({type(value).__name__}) cannot be written as an override")


def compose_jobs(
    jobs: Sequence[Sequence[str]],
    *,
    config_dir: str | Path | None = None,
    config_name: str = "config",
    announce: Callable[[int, Sequence[str]], None] | None = None,
) -> list[Pipeline]:
    """Each job's Pipeline, composed as `pk.load` would compose it.

    Hydra composes once per distinct set of group choices (`model=forest`); the jobs'
    value overrides (`stages.train.params.C=1`) are then applied to a copy of that config
    by Hydra's own override step, as its compose does after loading the defaults (a full
    composition per job, parsing and merging every file again, costs ~0.3 s here).
    """
    from copy import deepcopy

    from .config import composed, describe_hydra_error, override_key

    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser

        apply = ConfigLoaderImpl._apply_overrides_to_config
    except (ImportError, AttributeError):  # another Hydra: compose every job in full
        apply = None
    groups = _group_names(config_dir)
    bases: dict[tuple[str, ...], tuple[Any, Path | None]] = {}
    pipelines = []
    for number, job in enumerate(jobs):
        if announce is not None:
            announce(number, job)
        chosen = tuple(o for o in job if _is_group(override_key(o), groups))
        values = [o for o in job if o not in chosen]
        if apply is None:
            chosen, values = tuple(job), []
        if chosen not in bases:
            bases[chosen] = composed(list(chosen), config_dir=config_dir, config_name=config_name)
        cfg, source = bases[chosen]
        if values:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            cfg = deepcopy(cfg)
            try:
                apply(OverridesParser.create().parse_overrides(values), cfg)  # type: ignore[misc]
            except (HydraException, OmegaConfBaseException) as exc:
                message = describe_hydra_error(
                    exc, overrides=job, config_dir=config_dir, config_name=config_name
                )
                raise SweepError(f"sweep job #{number}: {message}") from exc
        pipelines.append(
            Pipeline.from_config(
                cfg,
                overrides=list(job),
                config_dir=config_dir,
                config_name=config_name,
                composed=True,
                source=source,
            )
        )
    return pipelines


def _group_names(config_dir: str | Path | None) -> set[str]:
    """Config groups: the folders of the user's config directory and of pipekit's `conf/`."""
    from .config import conf_dir

    roots = [conf_dir()]
    if config_dir is not None:
        roots.insert(0, Path(config_dir).expanduser())
    names = {"hydra"}
    for root in roots:
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir())
    return names


def _is_group(key: str, groups: set[str]) -> bool:
    """`model=forest`, `hydra/launcher=...`, `db@x=...` choose configs; `a.b=1` sets a value."""
    return "/" in key or "@" in key or key in groups or key.startswith("hydra")


# --- the result: a table ---------------------------------------------------------------------


@dataclass
class SweepJob:
    """One job of a sweep: its overrides, pipeline, result and MLflow parent run."""

    number: int
    overrides: tuple[str, ...]
    pipeline: Pipeline
    result: RunResult | None = None
    tracking: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.ok

    def metrics(self) -> dict[str, float]:
        """`stage.key` -> value of every numeric scalar output (what tracking logs)."""
        if self.result is None:
            return {}
        return {
            f"{stage}.{key}": value
            for stage, values in self.result.metrics().items()
            for key, value in values.items()
        }


class SweepResult(Sequence[dict[str, Any]]):
    """The sweep as a table: one row (a dict) per job; `best` is the winning row."""

    def __init__(
        self,
        sweep_id: str,
        jobs: list[SweepJob],
        swept: list[str],
        metric: str | None,
        mode: str,
        shared: int,
        tasks: int,
    ):
        self.sweep_id, self.jobs, self.swept = sweep_id, jobs, swept
        self.metric, self.mode = metric, mode
        #: stages computed once for several jobs, and the merged graph's task count
        self.shared, self.tasks = shared, tasks
        self.rows = [self._row(job) for job in jobs]

    def _row(self, job: SweepJob) -> dict[str, Any]:
        chosen = {}
        for override in job.overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") in self.swept:
                chosen[key.lstrip("+~")] = value
        row: dict[str, Any] = {"job": job.number, **chosen}
        row.update(job.metrics())
        row["status"] = "ok" if job.ok else "failed"
        if job.tracking.get("mlflow_run_id"):
            row["mlflow_run_id"] = job.tracking["mlflow_run_id"]
        return row

    def __getitem__(self, index: Any) -> Any:
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def results(self) -> list[RunResult | None]:
        return [job.result for job in self.jobs]

    @property
    def ok(self) -> bool:
        return all(job.ok for job in self.jobs)

    @property
    def best(self) -> dict[str, Any] | None:
        """The row with the best `metric` (highest, or lowest for mode=min), or None."""
        if not self.metric:
            return None
        scored = [r for r in self.rows if isinstance(r.get(self.metric), int | float)]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda r: r[self.metric])

    @property
    def best_job(self) -> SweepJob | None:
        row = self.best
        return self.jobs[row["job"]] if row is not None else None

    def columns(self) -> list[str]:
        found: dict[str, None] = {}
        for row in self.rows:
            found.update(dict.fromkeys(row))
        return list(found)

    def __str__(self) -> str:
        return self.text()

    def text(self, run_links: Mapping[int, str] | None = None) -> str:
        """The table as text; with `run_links` (job number -> the URL of its MLflow parent
        run, which holds the run id) the `mlflow_run_id` column shows those links."""
        columns = self.columns()
        rows = [columns] + [[_cell(r.get(c)) for c in columns] for r in self.rows]
        if run_links and "mlflow_run_id" in columns:
            at = columns.index("mlflow_run_id")
            rows[0] = [*columns[:at], "mlflow_run", *columns[at + 1 :]]
            for row, line in zip(self.rows, rows[1:], strict=True):
                line[at] = run_links.get(row["job"], line[at])
        head = (
            f"sweep {self.sweep_id[:8]}: {len(self.jobs)} jobs in one graph of {self.tasks} "
            f"tasks ({self.shared} stages computed once for several jobs)"
        )
        lines = [head, table(rows)]
        best = self.best
        if best is not None:
            swept = " ".join(f"{k}={best[k]}" for k in self.swept if k in best)
            lines.append(
                f"best: job #{best['job']} {swept} ({self.metric}={_cell(best[self.metric])}, "
                f"{self.mode})".replace("  ", " ")
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        import html

        columns = self.columns()
        best = self.best
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = []
        for row in self.rows:
            style = ' style="font-weight:bold"' if row is best else ""
            cells = "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns)
            body.append(f"<tr{style}>{cells}</tr>")
        return f"<table><tr>{head}</tr>{''.join(body)}</table>"

    def to_frame(self) -> Any:
        """The table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- running ---------------------------------------------------------------------------------


def sweep(
    name: str | None = None,
    params: Mapping[str, Iterable[Any]] | Sequence[str] = (),
    *,
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
    config_name: str = "config",
    targets: Iterable[str] | str | None = None,
    executor: str | None = None,
    best: str | None = None,
    mode: str | None = None,
    force: bool | Iterable[str] | None = None,
    observers: Iterable[Observer] = (),
    progress: bool | str = "auto",
) -> SweepResult:
    """Run every combination of `params` over pipeline `name` as one merged graph.

    `params` maps override keys to values (`{"stages.train.params.C": [0.1, 1, 10]}`) or
    is a list of Hydra sweep overrides (`["model=logreg,forest"]`); `overrides` apply to
    every job. Returns the table (a `SweepResult`); `.best` is the winning row by `best`
    (e.g. "evaluate.accuracy", default `sweep.metric`).
    """
    selects = any(o.split("=", 1)[0].lstrip("+~") == "pipeline" for o in overrides)
    fixed = [f"pipeline={name}"] if name and not selects else []
    jobs, swept = job_overrides([*fixed, *overrides, *sweep_overrides(params)])
    pipelines = compose_jobs(jobs, config_dir=config_dir, config_name=config_name)
    return run_sweep(
        pipelines,
        jobs,
        swept,
        targets=targets,
        executor=executor,
        best=best,
        mode=mode,
        force=force,
        observers=observers,
        progress=progress,
    )


@dataclass
class _Job:
    """What the merge needs to know about one job."""

    number: int
    pipeline: Pipeline
    stages: list[str]
    keys: dict[str, str]
    names: dict[str, str] = field(default_factory=dict)  # local stage -> merged name
    own: list[str] = field(default_factory=list)  # stages whose tracking this job owns
    tracker: MlflowObserver | None = None
    info: RunInfo | None = None
    planner: Any = None  # the job's cache.plan.Planner
    forced: Any = None


def run_sweep(
    pipelines: Sequence[Pipeline],
    overrides: Sequence[Sequence[str]],
    swept: Sequence[str] = (),
    *,
    targets: Iterable[str] | str | None = None,
    executor: str | None = None,
    best: str | None = None,
    mode: str | None = None,
    force: bool | Iterable[str] | None = None,
    observers: Iterable[Observer] = (),
    progress: bool | str = "auto",
) -> SweepResult:
    """Run composed jobs as one merged graph; their table. Stages with equal cache keys
    across jobs are computed once."""
    if not pipelines:
        raise SweepError("sweep: no jobs to run")
    first = pipelines[0]
    settings = checked(first.name, "sweep", first.spec.config.get("sweep"))
    metric = best or settings["metric"]
    if best and ":" in best:  # `--best evaluate.loss:min`
        metric, _, mode = best.rpartition(":")
    mode = check_value(first.name, "sweep", "mode", mode) if mode else settings["mode"]
    if metric:
        _check_metric(first, metric)
    run_settings = checked(first.name, "executor", first.spec.config.get("executor"))
    scheduler = run_settings["scheduler"]
    if executor:
        scheduler = check_value(first.name, "executor", "scheduler", executor)

    for pipeline in pipelines:  # a config error says so at once, not after waiting
        pipeline.validate()
    with run_locks(p.spec for p in pipelines):  # as a run of the pipeline: wait or skip
        jobs = [_plan(i, p, targets, force) for i, p in enumerate(pipelines)]
        merged = _merge(jobs)
        sweep_id = uuid.uuid4().hex
        spec = merged.spec(first.spec)
        run = RunInfo(
            spec=spec,
            graph=Graph.of(spec),
            stages=tuple(merged.order),
            executor=scheduler,
            run_id=sweep_id,
            started=time.time(),
            overrides=tuple(overrides[0]) if overrides else (),
            cache=None,
        )
        tracking = _JobTracking(jobs, merged, sweep_id)
        observer = Observers([tracking, *_progress_display(spec, progress), *observers])
        result = execute(
            run,
            merged.dsk,
            merged.computed,
            observer,
            cached=merged.cached,
            reasons=merged.reasons,
            meta=merged.meta,
            num_workers=run_settings["num_workers"],
        )
        done = []
        for job, job_overrides_ in zip(jobs, overrides, strict=True):
            job_result = _job_result(job, result, merged)
            entry = SweepJob(job.number, tuple(job_overrides_), job.pipeline, job_result)
            if job.tracker is not None:
                entry.tracking = dict(job.tracker.location())
                job_result.tracking.update(entry.tracking)
            done.append(entry)
        _link_shared(jobs, done, merged, sweep_id)
        shared = sum(1 for users in merged.users.values() if len(users) > 1)
        return SweepResult(sweep_id, done, list(swept), metric, mode, shared, len(merged.order))


def _check_metric(pipeline: Pipeline, metric: str) -> None:
    """`evaluate.accuracy`: the stage part must name a stage (or matrix) of the pipeline."""
    stage, dot, _ = metric.rpartition(".")
    known = [*pipeline.spec.stages, *pipeline.spec.matrices]
    if not dot or stage not in known:
        raise SweepError(
            f"{where(pipeline.name, key='sweep.metric')} '{metric}' must be stage.key, the "
            f"key of a stage's dict output{did_you_mean(stage or metric, known)}; e.g. "
            f"--best evaluate.accuracy"
        )


def _plan(
    number: int,
    pipeline: Pipeline,
    targets: Iterable[str] | str | None,
    force: bool | Iterable[str] | None,
) -> _Job:
    pipeline.validate()
    stages = pipeline.plan(targets)
    planner = pipeline._planner(pipeline.cache_store())
    keys = dict(planner.fingerprint(stages))
    return _Job(number, pipeline, stages, keys, planner=planner, forced=pipeline._forced(force))


class _Merged:
    """The merged graph: tasks, names, who uses what."""

    def __init__(self) -> None:
        self.dsk: dict[str, Any] = {}
        self.order: list[str] = []
        self.computed: list[str] = []
        self.cached: dict[str, CachedStage] = {}
        self.reasons: dict[str, str] = {}
        self.meta: dict[str, Mapping[str, Any]] = {}
        self.name_of: dict[str, str] = {}  # cache key -> merged name
        self.users: dict[str, list[tuple[int, str]]] = {}  # merged name -> (job, stage)
        self.stages: dict[str, Any] = {}  # merged name -> renamed spec.Stage

    def spec(self, first: PipelineSpec) -> PipelineSpec:
        return PipelineSpec(name=first.name, stages=dict(self.stages), config=first.config)


def _merge(jobs: list[_Job]) -> _Merged:
    merged = _Merged()
    count: dict[str, int] = {}
    for job in jobs:
        for stage in job.stages:
            count[job.keys[stage]] = count.get(job.keys[stage], 0) + 1
    total = len(jobs)
    for job in jobs:
        for stage in job.stages:
            key = job.keys[stage]
            name = merged.name_of.get(key)
            if name is None:
                name = stage if count[key] == total else f"{stage}#{job.number}"
                merged.name_of[key] = name
                job.own.append(stage)
            job.names[stage] = name
            merged.users.setdefault(name, []).append((job.number, stage))
    for job in jobs:
        _add_job(job, merged)
    return merged


def _add_job(job: _Job, merged: _Merged) -> None:
    """Decide (cache) and compile this job as a single run would; add its stages that no
    earlier job added (the first job's decision and task win for a shared stage)."""
    pipeline, planner = job.pipeline, job.planner
    if planner.store is None:
        dsk, computed, cached, reasons, meta = pipeline.tasks(job.stages), job.stages, {}, {}, {}
    else:
        plans = planner.decide(job.stages, force=job.forced, manifests=True)
        cached, computed = planner.prepare(job.stages, plans, False)
        dsk = pipeline.tasks(computed)
        meta = planner.store_outputs(dsk, computed)
        for name, hit in cached.items():
            if hit.loaded:
                dsk[name] = (Value(hit.output),)
        reasons = {s: plans[s].reason for s in computed}
    rename = job.names
    for stage in job.stages:
        name = rename[stage]
        if name in merged.stages:  # added by an earlier job; it may need this job's value
            if name in merged.cached and name not in merged.dsk and stage in dsk:
                merged.dsk[name] = _renamed(dsk[stage], rename)
            continue
        merged.stages[name] = _renamed_stage(pipeline.stages[stage], name, rename)
        merged.order.append(name)
        if stage in cached:
            merged.cached[name] = cached[stage]
            if stage in dsk:  # loaded: a computed stage reads it
                merged.dsk[name] = dsk[stage]
            continue
        merged.dsk[name] = _renamed(dsk[stage], rename)
        merged.computed.append(name)
        if stage in reasons:
            merged.reasons[name] = reasons[stage]
        if stage in meta:
            merged.meta[name] = meta[stage]


def _renamed(task: tuple, rename: Mapping[str, str]) -> tuple:
    """A stage's task tuple with its upstream stage names replaced by merged names."""
    return (task[0], *(rename.get(a, a) if isinstance(a, str) else a for a in task[1:]))


def _renamed_stage(stage: Any, name: str, rename: Mapping[str, str]) -> Any:
    inputs = {
        arg: replace(
            ref,
            stage=ref.stage if ref.members else rename.get(ref.stage, ref.stage),
            members=tuple(rename.get(m, m) for m in ref.members),
        )
        for arg, ref in stage.inputs.items()
    }
    after = tuple(rename.get(a, a) for a in stage.after)
    return replace(stage, name=name, inputs=inputs, after=after)


def _job_result(job: _Job, merged: RunResult, graph: _Merged) -> RunResult:
    """One job's RunResult, read from the merged run under the job's own stage names."""
    outputs, status, durations, errors, reasons, lazy = {}, {}, {}, {}, {}, {}
    for stage in job.stages:
        name = job.names[stage]
        status[stage] = merged.status[name]
        if name in merged.outputs:
            outputs[stage] = merged.outputs[name]
        elif name in merged:
            lazy[stage] = partial(merged.__getitem__, name)
        if name in merged.durations:
            durations[stage] = merged.durations[name]
        if name in merged.errors:
            errors[stage] = merged.errors[name]
        if name in merged.reasons:
            reasons[stage] = merged.reasons[name]
    info = job.info
    run_id = info.run_id if info is not None else merged.run_id
    return RunResult(
        job.pipeline.name, outputs, status, durations, errors, run_id, reasons=reasons, lazy=lazy
    )


class _JobTracking(Observer):
    """Each job's MlflowObserver, fed the merged run's events under the job's stage names.

    A stage shared by several jobs reaches only the tracker of the first job that has it
    (one nested run); the others link to it after the run (`_link_shared`).
    """

    wants_outputs = False

    def __init__(self, jobs: list[_Job], merged: _Merged, sweep_id: str):
        self.jobs, self.merged, self.sweep_id = jobs, merged, sweep_id
        self.trackers: dict[int, Observer] = {}
        for job in jobs:
            tracker = job.pipeline._tracker()
            if tracker is not None:
                job.tracker = tracker
                self.trackers[job.number] = tracker
        self.owner: dict[str, int] = {name: users[0][0] for name, users in merged.users.items()}

    def run_started(self, run: RunInfo) -> None:
        for job in self.jobs:
            job.info = RunInfo(
                spec=job.pipeline.spec,
                graph=job.pipeline.graph,
                stages=tuple(job.own),
                executor=run.executor,
                run_id=uuid.uuid4().hex,
                started=run.started,
                overrides=job.pipeline.overrides,
                cache=None,
            )
            tracker = self.trackers.get(job.number)
            if tracker is not None:
                tracker.run_started(job.info)

    def stage_changed(self, event: StageEvent) -> None:
        if not self.trackers:
            return
        owner = self.owner.get(event.stage)
        for number, stage in self.merged.users.get(event.stage, ()):
            tracker = self.trackers.get(number)
            if tracker is not None and number == owner:
                tracker.stage_changed(replace(event, stage=stage))

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        for job in self.jobs:
            tracker = self.trackers.get(job.number)
            if tracker is None or job.info is None:
                continue
            own = _job_result(job, result, self.merged)
            mine = set(job.own)
            trimmed = RunResult(
                own.pipeline,
                {s: v for s, v in own.outputs.items() if s in mine},
                {s: v for s, v in own.status.items() if s in mine},
                {s: v for s, v in own.durations.items() if s in mine},
                {s: v for s, v in own.errors.items() if s in mine},
                job.info.run_id,
                reasons={s: v for s, v in own.reasons.items() if s in mine},
            )
            tracker.run_finished(job.info, trimmed)

    def run_interrupted(self, run: RunInfo, error: BaseException) -> None:
        for job in self.jobs:
            tracker = self.trackers.get(job.number)
            if tracker is not None and job.info is not None:
                tracker.run_interrupted(job.info, error)


def _link_shared(jobs: list[_Job], done: list[SweepJob], merged: _Merged, sweep_id: str) -> None:
    """After the run: tag every parent with the sweep, link later jobs to the stage runs
    of shared stages, and complete the upstream-version tags of their model versions."""
    if not any(job.tracker is not None for job in jobs):
        return
    from .tracking import tags as tag
    from .tracking.client import client_for, log_batch, text
    from .tracking.observer import flatten_params

    by_number = {job.number: job for job in jobs}
    for job, entry in zip(jobs, done, strict=True):
        tracker = job.tracker
        if tracker is None or tracker.parent_run_id is None:
            continue
        client = client_for(tracker.uri)
        tags = {
            tag.SWEEP_ID: sweep_id,
            tag.SWEEP_JOB: text(f"{job.number}: {' '.join(entry.overrides)}"),
        }
        params: dict[str, str] = {}
        upstream: dict[str, tuple[str, str]] = {}
        for stage in job.stages:
            owner_number = merged.users[job.names[stage]][0][0]
            if owner_number == job.number:
                continue
            owner = by_number[owner_number].tracker
            owner_stage = merged.users[job.names[stage]][0][1]
            if owner is None:
                continue
            run_id = owner.stage_runs.get(owner_stage)
            if run_id:
                tags[f"{tag.SHARED}{tag.key_text(stage)}"] = run_id
            params.update(flatten_params(job.pipeline.stages[stage].params, f"{stage}."))
            if owner_stage in owner.versions:
                upstream[stage] = owner.versions[owner_stage]
        try:
            log_batch(client, tracker.parent_run_id, params=params, tags=tags)
            _upstream_tags(client, job, tracker, upstream, tag)
            if entry.result is not None and entry.result.failed:
                failed = [s for s in entry.result.failed if s not in job.own]
                if failed:  # a shared stage failed: this job failed too
                    first = entry.result.errors[failed[0]]
                    client.set_tag(tracker.parent_run_id, tag.ERROR, text(str(first)))
                    client.set_terminated(tracker.parent_run_id, "FAILED")
        except Exception as exc:  # tracking must not lose the sweep's results
            tracker.failures.append(f"sweep links: {type(exc).__name__}: {exc}")


def _upstream_tags(
    client: Any, job: _Job, tracker: Any, upstream: Mapping[str, tuple[str, str]], tag: Any
) -> None:
    """Model versions of this job's own stages name the shared upstream versions too."""
    if not upstream:
        return
    graph = job.pipeline.graph
    for stage in job.own:
        if stage not in tracker.versions:
            continue
        above = graph.upstream([stage]) - {stage}
        model, version = tracker.versions[stage]
        run_id = tracker.stage_runs.get(stage)
        for shared, (name, number) in upstream.items():
            if shared in above:
                client.set_model_version_tag(
                    model, version, tag.upstream(shared), f"{name}/{number}"
                )
                if run_id:
                    client.set_tag(run_id, tag.upstream(shared), f"{name}/{number}")


# --- the command line ------------------------------------------------------------------------


def run_cli(
    overrides: Sequence[str],
    *,
    config_dir: str | None = None,
    config_name: str = "config",
    targets: Sequence[str] = (),
    force: bool | Iterable[str] | None = None,
    best: str | None = None,
    quiet: bool = False,
    flags: Sequence[str] = (),
) -> int:
    """`pipekit run -m ...` on Hydra's basic launcher: the merged sweep; its exit code.

    `flags` are the command's own options as typed (for the line that reruns one job)."""
    from .config import command_line
    from .core.redact import scrub
    from .display.progress import TextProgress

    jobs, swept = job_overrides(overrides)
    sys.stderr.write(
        f"pipekit: sweep of {len(jobs)} jobs ({', '.join(swept) or 'no swept keys'}) as one graph\n"
    )

    def announce(number: int, job: Sequence[str]) -> None:  # the line that runs it alone
        again = command_line(
            "run", job, config_dir=config_dir, config_name=config_name, flags=flags
        )
        sys.stderr.write(f"pipekit: sweep job #{number}: {again}\n")

    pipelines = compose_jobs(
        jobs, config_dir=config_dir, config_name=config_name, announce=announce
    )
    try:
        result = run_sweep(
            pipelines,
            jobs,
            swept,
            targets=list(targets) or None,
            best=best,
            force=force,
            observers=[] if quiet else [TextProgress(sys.stderr)],
            progress=False,
        )
    except RunSkipped as skipped:  # `concurrency: skip` and another run holds the lock
        sys.stderr.write(f"pipekit: {skipped}\n")
        return 0
    for job in result.jobs:  # each job's metrics as a single run prints them
        shown = " ".join(o for o in job.overrides if o.split("=", 1)[0].lstrip("+~") in swept)
        print(f"# job #{job.number} {shown}".rstrip())
        for stage, values in (job.result.metrics() if job.result is not None else {}).items():
            print(f"{stage}: {' '.join(f'{k}={v:.4g}' for k, v in values.items())}")
    print(result.text(_run_links(result.jobs)))
    if result.metric and result.best is None:
        known = sorted({k for j in result.jobs for k in j.metrics()})
        sys.stderr.write(
            f"pipekit: error: no job produced metric '{result.metric}'; metrics are "
            f"{', '.join(known) or 'none'}\n"
        )
        return 1
    failed = [job for job in result.jobs if not job.ok]
    for job in failed:
        errors = job.result.errors if job.result is not None else {}
        if errors:
            first = str(next(iter(errors.values()))).splitlines()[0]
            sys.stderr.write(f"pipekit: error: sweep job #{job.number}: {first}\n")
    if not quiet:
        for line in _tracked_lines(result):
            sys.stderr.write(f"pipekit: {scrub(line)}\n")
    return 1 if failed else 0


def _run_links(jobs: Sequence[SweepJob]) -> dict[int, str]:
    """Job number -> its MLflow parent run's page in the UI's "Model training" view (the
    links `pipekit run` closes with: a server's own UI, else `mlflow ui`'s address)."""
    from .core.redact import scrub  # URL passwords stay out of terminals and CI logs
    from .tracking.client import LOCAL_UI, ui_base, ui_links

    links = {}
    for job in jobs:
        where = job.tracking
        if where.get("mlflow_run_id"):
            base = ui_base(where["mlflow_uri"]) or LOCAL_UI
            _, url = ui_links(base, where["mlflow_experiment_id"], where["mlflow_run_id"])
            links[job.number] = scrub(url)
    return links


def _tracked_lines(result: SweepResult) -> list[str]:
    """One closing line per MLflow experiment the jobs went to (one, unless the sweep
    varies the experiment): its runs table in the "Model training" view."""
    from .tracking.client import LOCAL_UI, ui_base, ui_links

    runs: dict[tuple[str, str], list[str]] = {}
    for job in result.jobs:
        where = job.tracking
        if where.get("mlflow_run_id"):
            at = (where["mlflow_uri"], where["mlflow_experiment_id"])
            runs.setdefault(at, []).append(where["mlflow_run_id"])
    lines = []
    for (uri, experiment), ids in runs.items():
        base = ui_base(uri)
        url = ui_links(base or LOCAL_UI, experiment, ids[0])[0]
        said = (
            f"tracked {len(ids)} parent runs tagged pipekit.sweep_id={result.sweep_id} in "
            f"MLflow experiment {experiment}"
        )
        if base is not None:
            lines.append(f"{said}: {url}")
        else:
            lines.append(f"{said} ({uri}) at {url}; browse: mlflow ui --backend-store-uri {uri}")
    return lines


class _CallableModule(types.ModuleType):
    """`import pipekit.sweep` binds this module as `pipekit.sweep`, where users call the
    function `pk.sweep(...)`: the module calls it, whichever of the two they got."""

    def __call__(self, *args: Any, **kwargs: Any) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""MLflow tracking: a parent run per pipeline run, a nested run per stage, model versions.

What goes where (docs/tracking.md has the full table):

- parent run (experiment = pipeline name), named for people (`tags.run_name`: `cancer
  C=0.5`): tags `pipekit.pipeline`, `pipekit.run_id`, `pipekit.config_hash`,
  `pipekit.overrides`, `mlflow.source.git.commit`; params `stage.param` of every planned
  stage; metrics `stage.metric` and `stage.duration_s`; artifacts `config.yaml`, `dag.svg`.
- nested run per executed stage (`mlflow.parentRunId`), opened in a topological order
  with increasing start times: its params, metrics, duration, state, cache hit, error tag
  and `traceback.txt` when it failed.
- `model: true` stages: the output logged as an MLflow 3 logged model (source run: the
  stage run; metrics: those of the stages evaluating it) and registered from it as
  `<pipeline>.<stage>`, the version tagged with the parent run, the config hash and
  `pipekit.upstream.<stage>` = the upstream model versions it consumed.

Every MLflow call goes through `MlflowClient` with an explicit run id, from one writer
per pipeline run (`writer.py`): stages running in parallel threads or processes can never
log into each other's runs, and Dask's scheduler never waits on the tracking store. Which
process talks to MLflow: in notebooks and `Pipeline.run` from Python, a thread of the
process that runs the pipeline; under `pipekit run`, a writer process the CLI starts
before composing the config, running these same methods on a copy of this observer. The
hooks below run in the driver and only submit work; the methods after them are the
writer's. The run is flushed before `Pipeline.run` returns, so no run is left RUNNING.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..cache.fingerprint import digest
from ..core.events import Observer, RunInfo, StageEvent
from ..core.metrics import numeric_items
from ..core.redact import redact, redact_overrides, scrub, secret_values
from ..core.result import RunResult
from ..core.serving import StageExamples
from ..core.spec import PipelineSpec, flat_params
from ..core.states import count_states
from . import tags as tag
from .client import (
    check_reachable,
    client_for,
    experiment_id,
    log_batch,
    log_model,
    log_text,
    now_ms,
    register,
    run_for_cache_key,
    text,
    version_for_cache_key,
)
from .flavors import sample
from .promotion import promote, prune_versions
from .settings import settings_from_config
from .writer import ProcessWriter, ThreadWriter, open_writer

log = logging.getLogger(__name__)


def observer_from_config(pipeline: str, section: Mapping[str, Any]) -> MlflowObserver | None:
    """The tracking observer a pipeline's `tracking` section asks for (None when off)."""
    settings = settings_from_config(pipeline, section)
    if settings.backend == "off" or section.get("enabled", True) is False:
        return None
    return MlflowObserver(
        settings.uri,
        experiment=settings.experiment,
        artifacts=settings.artifacts,
        sqlite_wal=settings.wal,
        on_error=settings.on_error,
    )


def flatten_params(
    values: Mapping[str, Any], prefix: str = "", secrets: set[str] | None = None
) -> dict[str, str]:
    """Nested mappings as dotted keys (`train.C`), values as strings MLflow accepts;
    secret-looking keys (and `secrets` found elsewhere in the config) as `***`."""
    return {
        name: text(value)
        for name, value in flat_params(redact(dict(values), secrets), prefix).items()
    }


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of the resolved config; where it is logged (`tracking`) is left out."""
    relevant = {k: v for k, v in config.items() if k not in ("tracking", "hydra")}
    return digest(json.dumps(relevant, sort_keys=True, default=str, separators=(",", ":")), 8)


def git_commit(start: str | Path | None = None) -> str | None:
    """The commit checked out in the repository containing `start` (cwd), or None.

    Reads `.git` directly (HEAD, loose refs, packed-refs); `git` is never required.
    """
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        dot_git = folder / ".git"
        if dot_git.exists():
            try:
                return _read_head(dot_git)
            except OSError:
                return _git_rev_parse(folder)
    return None


def _read_head(dot_git: Path) -> str | None:
    if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
        target = dot_git.read_text().strip().removeprefix("gitdir:").strip()
        dot_git = (dot_git.parent / target).resolve()
    head = (dot_git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head or None
    ref = head[4:].strip()
    common = dot_git
    if (dot_git / "commondir").is_file():
        common = (dot_git / (dot_git / "commondir").read_text().strip()).resolve()
    for root in (dot_git, common):
        loose = root / ref
        if loose.is_file():
            return loose.read_text().strip()
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref:
                return sha
    return None  # a fresh repository without commits


def _git_rev_parse(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --- the observer -----------------------------------------------------------------------


class MlflowObserver(Observer):
    """Logs pipeline runs to MLflow. After a run: `parent_run_id`, `stage_runs`, `versions`.

    It never asks for cached outputs: metrics of a cached stage come from its cache
    manifest, its model version from the registry (tagged with the cache key), and only a
    cached model stage without any version loads its output, in the writer.
    """

    wants_outputs = False

    def __init__(
        self,
        uri: str,
        *,
        experiment: str | None = None,
        artifacts: str | None = None,
        log_models: bool = True,
        sqlite_wal: bool = True,
        on_error: str = "warn",
    ):
        self.uri = uri
        self.sqlite_wal = sqlite_wal
        #: `warn` or `fail`: whether a run whose tracking failed fails (`tracking.on_error`)
        self.on_error = on_error
        self.experiment = experiment
        self.artifacts = artifacts
        self.log_models = log_models
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        #: stage -> MLflow run id of its nested run
        self.stage_runs: dict[str, str] = {}
        #: model stage -> (registered model name, version) it produced or reused
        self.versions: dict[str, tuple[str, str]] = {}
        #: model stage -> id of the MLflow 3 logged model it produced or reused
        self.model_ids: dict[str, str] = {}
        self.failures: list[str] = []
        self._writer: ThreadWriter | ProcessWriter | None = None
        self._client: Any = None
        self._run: RunInfo | None = None
        self._artifact_uris: dict[str, str] = {}
        self._open: dict[str, int] = {}
        self._closed: set[str] = set()
        self._broken: set[str] = set()
        self._parent_metrics: dict[str, float] = {}
        self._ancestors: dict[str, list[str]] = {}
        self._order: list[str] = []
        self._hash = ""
        self._secrets: set[str] = set()
        self._last_start = 0  # ms: stage runs start in the order they open (`_open_stage`)
        self._shift: dict[str, int] = {}
        #: driver side: upstream stage -> (model stage, argument, key) it feeds; samples
        self._feeds: dict[str, list[tuple[str, str, str | None]]] | None = None
        self._samples: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"<MlflowObserver {self.uri!r} experiment={self.experiment!r}>"

    # hooks: called in the driver; they only queue work for the writer (thread or process)

    def run_started(self, run: RunInfo) -> None:
        self._close_writer()
        self._run = run
        self.parent_run_id, self.experiment_id = None, None
        self.stage_runs, self.versions, self.failures = {}, {}, []
        self._artifact_uris, self._open, self._closed = {}, {}, set()
        self._broken = set()
        self._parent_metrics = {}
        self._ancestors = {}
        self.model_ids, self._last_start, self._shift = {}, 0, {}
        self._feeds, self._samples = None, {}
        self._order = list(run.stages)
        self._hash = config_hash(run.spec.config)
        self._examples = StageExamples(run.spec)  # input examples from the serve section
        self._secrets = set()  # found by the writer thread: the driver does not wait
        self._writer = open_writer(self, f"pipekit-mlflow-{run.run_id[:8]}")  # writer.py
        self._writer.submit(self._start_parent, run, int(run.started * 1000))

    def stage_changed(self, event: StageEvent) -> None:
        if self._writer is None:
            return
        if event.state == "running":
            upstream = self._run.spec.stages[event.stage].upstream  # type: ignore[union-attr]
            if not any(name in self._broken for name in upstream):  # else it will be skipped
                self._writer.submit(self._open_stage, event.stage, now_ms())
        elif event.state in ("failed", "skipped"):
            self._broken.add(event.stage)
        if event.state == "done":  # rows of what it feeds a model stage, for input examples
            event = self._sampled(event)
        if event.state in ("done", "cached", "failed"):
            self._closed.add(event.stage)
            self._writer.submit(self._close_stage, event, now_ms())

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        if self._writer is None:
            return
        for stage, state in result.status.items():  # stages whose events never came
            if stage not in self._closed and state in ("done", "cached", "failed"):
                error = result.errors.get(stage)
                event = StageEvent(
                    stage,
                    state,
                    time.perf_counter(),
                    result.durations.get(stage),
                    output=result.outputs.get(stage),
                    error=error.cause if error is not None and error.cause else error,
                    traceback=getattr(error, "traceback", "") or "",
                )
                self.stage_changed(event)
        self._writer.submit(self._finish_parent, result)
        self._close_writer()

    def location(self) -> dict[str, str]:
        """Where the last run went: `mlflow_uri`, `mlflow_experiment_id`, `mlflow_run_id`."""
        if self.parent_run_id is None:
            return {}
        return {
            "mlflow_uri": self.uri,
            "mlflow_experiment_id": str(self.experiment_id),
            "mlflow_run_id": self.parent_run_id,
        }

    def failure(self) -> dict[str, str]:
        """When the last run's tracking failed: `tracking_error` (the first failure) and
        `on_error` (`warn` or `fail`), for `RunResult.tracking`; else {}."""
        if not self.failures:
            return {}
        return {"tracking_error": self.failures[0], "on_error": self.on_error}

    def check(self, result: RunResult) -> None:
        """Raise TrackingFailedError for a run whose tracking failed when `on_error=fail`."""
        if self.failures and self.on_error == "fail":
            from ..errors import TrackingFailedError

            raise TrackingFailedError(
                f"tracking failed: {self.failures[0]}; the run's results are not (all) in "
                f"MLflow (tracking.on_error=fail)",
                result=result,
            )

    def run_interrupted(self, run: RunInfo, error: BaseException) -> None:
        if self._writer is None:
            return
        self._writer.submit(self._kill, error)
        self._close_writer()

    def _sampled(self, event: StageEvent) -> StageEvent:
        """Driver side: keep a few rows (`flavors.sample`) of a finished stage's output
        where a model stage takes it as an input; a model stage's event gets its inputs'
        rows as `meta["input_examples"]` (argument -> rows), from which its logged model
        infers an input example and signature when the serve section gives none."""
        run = self._run
        if run is None:
            return event
        if self._feeds is None:
            self._feeds = {}
            for name, spec in run.spec.stages.items():
                for arg, ref in spec.inputs.items() if spec.model else ():
                    if not ref.members:
                        self._feeds.setdefault(ref.stage, []).append((name, arg, ref.key))
        if event.output is not None:
            for model, arg, key in self._feeds.get(event.stage, ()):
                try:
                    value = event.output if key is None else event.output[key]
                except Exception:  # the run reports a missing key; no example from it
                    continue
                rows = sample(value)
                if rows is not None:
                    self._samples.setdefault(model, {})[arg] = rows
        found = self._samples.pop(event.stage, None)
        if not found:
            return event
        return replace(event, meta={**event.meta, "input_examples": found})

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            finally:
                self.failures.extend(writer.failures)

    # the writer's work: its thread, or the writer process (writer.py) -----------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client_for(self.uri, sqlite_wal=self.sqlite_wal)
        return self._client

    def _start_parent(self, run: RunInfo, started_ms: int) -> None:
        pipeline = run.spec
        self._secrets = secret_values(pipeline.config)  # masked wherever they reappear
        check_reachable(self.uri)
        client = self.client
        self.experiment_id = experiment_id(client, self.experiment or pipeline.name, self.artifacts)
        tags = {
            tag.RUN_NAME: tag.run_name(pipeline.name, run.overrides, run.run_id, pipeline.config),
            "mlflow.source.name": f"pipekit:{pipeline.name}",
            "mlflow.source.type": "LOCAL",
            tag.PIPELINE: pipeline.name,
            tag.RUN_ID: run.run_id,
            tag.CONFIG_HASH: self._hash,
            tag.EXECUTOR: run.executor,
            tag.STAGES: text(",".join(run.stages)),
            tag.OVERRIDES: text(" ".join(redact_overrides(run.overrides, pipeline.config))),
        }
        description = pipeline.config.get("description")
        if isinstance(description, str) and description:
            tags["mlflow.note.content"] = scrub(description, self._secrets)
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags[tag.GIT_COMMIT] = commit
        user = os.environ.get("USER") or os.environ.get("USERNAME")
        if user:
            tags["mlflow.user"] = user
        parent = client.create_run(self.experiment_id, start_time=started_ms, tags=tags)
        self.parent_run_id = parent.info.run_id
        params: dict[str, str] = {}
        for name in run.stages:
            params.update(flatten_params(pipeline.stages[name].params, f"{name}.", self._secrets))
        log_batch(client, self.parent_run_id, params=params)
        where_to = parent.info.artifact_uri
        config = redact(pipeline.config, self._secrets)
        log_text(client, self.parent_run_id, where_to, _config_yaml(config), "config.yaml")
        svg = _dag_svg(pipeline, self._secrets)
        if svg:
            log_text(client, self.parent_run_id, where_to, svg, "dag.svg")

    def _open_stage(
        self, stage: str, started_ms: int, extra: Mapping[str, str] | None = None
    ) -> None:
        if self.parent_run_id is None or stage in self.stage_runs:
            return
        run = self._run
        assert run is not None
        spec = run.spec.stages[stage]
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": stage,
            tag.PIPELINE: run.name,
            tag.STAGE: stage,
            tag.TARGET: spec.target,
            tag.RUN_ID: run.run_id,
            **(extra or {}),
        }
        if spec.description:
            tags["mlflow.note.content"] = scrub(spec.description, self._secrets)
        if spec.matrix:  # a matrix member: searchable by its matrix and its values
            tags[tag.MATRIX] = stage.partition("[")[0]
            tags[tag.MEMBER] = text(dict(spec.matrix))
        for upstream, (model, version) in self._upstream_versions(stage).items():
            tags[tag.upstream(upstream)] = f"{model}/{version}"
        # start times strictly increase in the order stage runs are opened (a topological
        # order: a stage opens after its inputs), so MLflow's UI, which sorts nested runs
        # by start time, lists them in DAG order; the end time moves as much (`_shift`)
        opened = max(started_ms, self._last_start + 1)
        self._last_start = opened
        if opened != started_ms:
            self._shift[stage] = opened - started_ms
        child = self.client.create_run(self.experiment_id, start_time=opened, tags=tags)
        self.stage_runs[stage] = child.info.run_id
        self._artifact_uris[stage] = child.info.artifact_uri
        self._open[stage] = opened
        consumed = [self.model_ids[n] for n in self._model_inputs(stage) if n in self.model_ids]
        if consumed:  # MLflow 3: the run's "Logged models" list the models it applied
            from mlflow.entities import LoggedModelInput

            self.client.log_inputs(
                child.info.run_id, models=[LoggedModelInput(m) for m in consumed]
            )

    def _close_stage(self, event: StageEvent, ended_ms: int) -> None:
        """Params, metrics, model version, promotion, then the run's final status.

        Tags known when the run opens go into `create_run`, the rest into one `log_batch`:
        each MLflow call costs a few milliseconds on SQLite.
        """
        if self.parent_run_id is None:
            return
        run = self._run
        assert run is not None
        stage = event.stage
        spec = run.spec.stages[stage]
        meta = event.meta if isinstance(event.meta, Mapping) else {}
        passed = event.state in ("done", "cached")
        cache_key = meta.get("cache_key")
        tags: dict[str, str] = {tag.CACHE_KEY: str(cache_key)} if cache_key else {}
        if event.state == "cached":
            tags[tag.CACHE_HIT] = "true"
        elif event.attempts > 1:  # retries: attempts made, and what failed first
            tags[tag.ATTEMPTS] = f"{event.attempt}/{event.attempts}"
            errors = meta.get("attempt_errors") or ()
            if errors:
                tags[tag.FIRST_ERROR] = text(scrub(str(errors[0]), self._secrets))
        if stage not in self.stage_runs:  # cached (or no `running` event): open it now
            seconds = event.duration or 0.0
            self._open_stage(stage, ended_ms - int(seconds * 1000), tags)
            tags = {}
        run_id = self.stage_runs[stage]
        ended_ms += self._shift.pop(stage, 0)  # as far as its start moved (`_open_stage`)
        client = self.client
        metrics: dict[str, float] = {}
        scores: dict[str, float] = {}  # also metrics of the models it evaluates
        if event.duration is not None:
            metrics["duration_s"] = float(event.duration)
            self._parent_metrics[f"{stage}.duration_s"] = float(event.duration)
        if passed:
            for name, value in self._metrics(event, meta, spec.metrics).items():
                scores[name] = value
                self._parent_metrics[f"{stage}.{name}"] = value
        else:
            error = event.error
            reason = f"{type(error).__name__}: {error}" if error is not None else "failed"
            reason = scrub(reason, self._secrets)
            tags[tag.ERROR] = text(reason)
            where_to = self._artifact_uris[stage]
            trace = scrub(event.traceback, self._secrets) if event.traceback else reason
            log_text(client, run_id, where_to, trace, "traceback.txt")
        source_run = None
        if passed and spec.model and self.log_models:
            try:
                name, version, source_run = self._model_version(stage, event, run_id)
                tags[tag.MODEL_VERSION] = f"{name}/{version}"
            except Exception as exc:  # e.g. an unpicklable output: the run still ends
                tags[tag.MODEL_ERROR] = text(f"{type(exc).__name__}: {exc}")
                self._note_failure(f"{stage}: model not logged: {type(exc).__name__}: {exc}")
        if passed and spec.promote:
            try:
                promoted = self._promote(spec.promote, stage)
            except Exception as exc:
                promoted = []
                tags[tag.PROMOTE_ERROR] = text(f"{type(exc).__name__}: {exc}")
                self._note_failure(f"{stage}: promotion failed: {type(exc).__name__}: {exc}")
            if promoted:
                tags[tag.PROMOTED] = text(f"@{spec.promote}: {', '.join(promoted)}")
        if event.state == "cached" and cache_key:
            source_run = source_run or run_for_cache_key(client, self.experiment_id, cache_key)
            if source_run and source_run != run_id:
                tags[tag.CACHE_SOURCE_RUN] = source_run
        params = flatten_params(spec.params, f"{stage}.", self._secrets)
        evaluated = [
            self.model_ids[n] for n in self._model_inputs(stage, True) if n in self.model_ids
        ]
        try:
            log_batch(
                client,
                run_id,
                params=params,
                metrics=metrics,
                tags=tags,
                model_metrics=scores,
                model_ids=evaluated,
            )
        finally:  # a rejected value must not leave the run RUNNING
            client.set_terminated(run_id, "FINISHED" if passed else "FAILED", end_time=ended_ms)
            self._open.pop(stage, None)

    @staticmethod
    def _metrics(
        event: StageEvent, meta: Mapping[str, Any], keys: tuple[str, ...]
    ) -> dict[str, float]:
        """A stage's metrics: from its output, or from its cache manifest when cached."""
        if event.state != "cached":
            return numeric_items(event.output, keys or None)
        manifest = meta.get("manifest")
        stored = manifest.get("metrics") if isinstance(manifest, Mapping) else None
        return numeric_items(stored, keys or None) if isinstance(stored, Mapping) else {}

    def _upstream_versions(self, stage: str) -> dict[str, tuple[str, str]]:
        """Model stages upstream of `stage` (transitively) and the versions they produced."""
        run = self._run
        assert run is not None
        if stage not in self._ancestors:
            above = run.graph.upstream([stage]) - {stage}
            stages = run.spec.stages
            self._ancestors[stage] = [n for n in self._order if n in above and stages[n].model]
        return {
            name: self.versions[name] for name in self._ancestors[stage] if name in self.versions
        }

    def _model_inputs(self, stage: str, nearest: bool = False) -> list[str]:
        """Model stages whose outputs `stage` takes as inputs: the models it applies. With
        `nearest`, without those upstream of another one: the models its metrics are of
        (`evaluate` <- `train`, not also the `features` that `train` was fitted on)."""
        run = self._run
        assert run is not None
        stages = run.spec.stages
        direct = dict.fromkeys(
            name
            for ref in stages[stage].inputs.values()
            for name in ref.sources
            if name in stages and stages[name].model
        )
        if not nearest or len(direct) < 2:
            return list(direct)
        return [
            name
            for name in direct
            if not any(other != name and name in run.graph.upstream([other]) for other in direct)
        ]

    def _model_version(self, stage: str, event: StageEvent, run_id: str) -> tuple[str, str, str]:
        """Register the stage output, or find the version its cache entry already produced:
        (registered model, version, the run that logged it)."""
        run = self._run
        assert run is not None
        client = self.client
        name = f"{run.name}.{stage}"
        cache_key = event.meta.get("cache_key") if isinstance(event.meta, Mapping) else None
        if event.state == "cached" and cache_key:
            found = version_for_cache_key(client, name, str(cache_key))
            if found is not None:
                self.versions[stage] = (name, found[0])
                if found[2]:
                    self.model_ids[stage] = found[2]
                self._examples.add(stage, load=event.meta.get("load"))
                return name, found[0], found[1]
        output = event.output
        if event.state == "cached":  # no version yet (e.g. tracked for the first time)
            load = event.meta.get("load") if isinstance(event.meta, Mapping) else None
            if load is None:
                raise ValueError("the cached output is not available to log")
            output = load()
        spec = run.spec.stages[stage]
        tags = {
            tag.PIPELINE: run.name,
            tag.STAGE: stage,
            tag.PARENT_RUN_ID: self.parent_run_id or "",
            tag.RUN_ID: run.run_id,
            tag.CONFIG_HASH: self._hash,
        }
        if cache_key:
            tags[tag.CACHE_KEY] = str(cache_key)
        # the input example: what serving feeds the model (the serve section), else a few
        # rows of what the stage received (`_sampled`); neither: no signature
        inputs = event.meta.get("input_examples") if isinstance(event.meta, Mapping) else None
        flavor, model = log_model(
            client,
            run_id,
            str(self.experiment_id),
            stage,
            output,
            input_example=self._examples.input_for(stage, output),
            candidates=inputs,
            tags=tags,
            params=flatten_params(spec.params, "", self._secrets),
        )
        self.model_ids[stage] = model.model_id
        tags = {**tags, tag.FLAVOR: flavor, tag.MODEL_ID: model.model_id}
        for upstream, (upstream_model, version) in self._upstream_versions(stage).items():
            tags[tag.upstream(upstream)] = f"{upstream_model}/{version}"
        created = register(client, name, model.artifact_location, run_id, tags, spec, model)
        version = str(created.version)
        self.versions[stage] = (name, version)
        keep = run.spec.section("tracking").get("keep_versions")  # retention (promotion.py)
        prune_versions(client, self.uri, name, keep, self._note_failure)
        return name, version, run_id

    def _note_failure(self, message: str) -> None:
        log.warning("pipekit tracking: %s", message)
        self.failures.append(message)

    def _promote(self, alias: str, stage: str) -> list[str]:
        """Move `alias` on the versions of the model stages at or upstream of a passing
        stage: always, or when they beat its holder on `promote.metric` (promotion.py)."""
        run = self._run
        assert run is not None
        own = {stage: self.versions[stage]} if stage in self.versions else {}
        versions = {**self._upstream_versions(stage), **own}
        metrics, run_id = self._parent_metrics, self.stage_runs.get(stage)
        return promote(self.client, self.uri, run.spec, run.graph, stage, versions, metrics, run_id)

    def _finish_parent(self, result: RunResult) -> None:
        if self.parent_run_id is None:
            return
        self._end_open_stages("KILLED", "the run ended before this stage finished")
        tags = {tag.STATUS: count_states(result.status.values())}
        skipped = [name for name, state in result.status.items() if state == "skipped"]
        if skipped:
            tags[tag.SKIPPED_STAGES] = text(",".join(skipped))
        if result.failed:
            tags[tag.FAILED_STAGES] = ",".join(result.failed)
            first = result.errors[result.failed[0]]
            tags[tag.ERROR] = text(scrub(str(first), self._secrets))
        status = "FAILED" if result.failed else "FINISHED"
        try:
            log_batch(self.client, self.parent_run_id, metrics=self._parent_metrics, tags=tags)
        finally:
            self.client.set_terminated(self.parent_run_id, status, end_time=now_ms())

    def _kill(self, error: BaseException) -> None:
        if self.parent_run_id is None:
            return
        interrupted = isinstance(error, KeyboardInterrupt)  # Ctrl-C, or SIGTERM in the CLI
        how = getattr(error, "signame", None) or "Ctrl-C"
        reason = f"interrupted ({how})" if interrupted else f"{type(error).__name__}: {error}"
        status = "KILLED" if interrupted else "FAILED"
        try:
            self._end_open_stages(status, reason)
            tags = {tag.ERROR: text(reason)}
            log_batch(self.client, self.parent_run_id, metrics=self._parent_metrics, tags=tags)
        finally:
            self.client.set_terminated(self.parent_run_id, status, end_time=now_ms())

    def _end_open_stages(self, status: str, reason: str) -> None:
        for stage in list(self._open):
            run_id = self.stage_runs[stage]
            self.client.set_tag(run_id, tag.ERROR, reason)
            self.client.set_terminated(run_id, status, end_time=now_ms())
            self._open.pop(stage, None)


def _config_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    try:
        return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    except yaml.YAMLError:
        return json.dumps(config, indent=2, default=str)


def _dag_svg(spec: PipelineSpec, secrets: set[str] | None = None) -> str | None:
    """The drawn DAG (drawings are kept, so re-runs skip `dot`), or None without Graphviz.

    Its tooltips show params: secret ones are drawn as `***` (see `core.redact`).
    """
    try:
        from ..display.render import render

        return str(render(_redacted_spec(spec, secrets), format="svg"))
    except Exception as exc:  # optional: tracking works without a drawing
        log.debug("pipekit tracking: no DAG drawing: %s", exc)
        return None


def _redacted_spec(spec: PipelineSpec, secrets: set[str] | None) -> PipelineSpec:
    """`spec` with its stages' secret params masked (the same object when there are none)."""
    from dataclasses import replace

    stages = {}
    for name, stage in spec.stages.items():
        params = redact(dict(stage.params), secrets)
        stages[name] = stage if params == stage.params else replace(stage, params=params)
    if all(stages[name] is stage for name, stage in spec.stages.items()):
        return spec
    return replace(spec, stages=stages, config=redact(spec.config, secrets))

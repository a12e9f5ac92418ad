"""MLflow tracking: a parent run per pipeline run, a nested run per stage, model versions.

What goes where (docs/tracking.md has the full table):

- parent run (experiment = pipeline name): tags `pipekit.pipeline`, `pipekit.run_id`,
  `pipekit.config_hash`, `pipekit.overrides`, `mlflow.source.git.commit`; params
  `stage.param` of every planned stage; metrics `stage.metric` and `stage.duration_s`;
  artifacts `config.yaml` and `dag.svg`.
- nested run per executed stage (`mlflow.parentRunId`): its params, metrics, duration,
  state, cache hit, error tag and `traceback.txt` when it failed.
- `model: true` stages: the output logged as an MLflow model under the stage run and
  registered as `<pipeline>.<stage>`, the version tagged with the parent run, the config
  hash and `pipekit.upstream.<stage>` = the upstream model versions it consumed.

Every MLflow call goes through `MlflowClient` with an explicit run id, from one writer
thread per pipeline run: stages running in parallel threads or processes can never log
into each other's runs, and Dask's scheduler never waits on the tracking store. The run
is flushed before `Pipeline.run` returns, so no run is left RUNNING.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
from ..errors import PipekitError, TrackingUnavailableError
from . import tags as tag
from .client import (
    check_reachable,
    client_for,
    experiment_id,
    http_limits,
    log_batch,
    log_model,
    log_text,
    now_ms,
    register,
    run_for_cache_key,
    text,
    version_for_cache_key,
)
from .promotion import promote, prune_versions
from .settings import settings_from_config

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


# --- the writer thread ------------------------------------------------------------------


class _Writer:
    """One thread that performs MLflow calls in submission order; errors are logged, once."""

    def __init__(self, name: str, uri: str = ""):
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.failures: list[str] = []
        self.uri = uri
        #: the server stopped answering: the rest of the work is dropped, not retried
        self.gone: str | None = None
        self._thread.start()

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        self._queue.put((func, args))

    def close(self, grace: float = 30.0) -> None:
        """Run everything submitted, then stop the thread (waits for it).

        For `grace` seconds a second Ctrl-C or a SIGTERM waits too (then takes effect): it
        must not leave runs RUNNING. After that the wait can be interrupted as usual.
        """
        self._queue.put(None)
        with _sigint_deferred():
            self._thread.join(grace)
        self._thread.join()

    def _loop(self) -> None:
        with http_limits():
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self.gone is None:
                    self._call(*item)

    def _call(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            func(*args)
        except Exception as exc:
            message = failure_text(exc)
            self.failures.append(message)
            debug = log.isEnabledFor(logging.DEBUG)
            log.warning("pipekit tracking: %s", message, exc_info=debug)
            if isinstance(exc, TrackingUnavailableError):
                self.gone = message
            elif self.uri.startswith(("http://", "https://")):
                try:  # one quick look instead of MLflow's retries on every later call
                    check_reachable(self.uri)
                except TrackingUnavailableError as down:
                    self.gone = str(down)
                    log.warning(
                        "pipekit tracking: %s; the run's remaining MLflow calls are dropped", down
                    )


def failure_text(exc: BaseException) -> str:
    """One line for a tracking failure: pipekit's own errors say it all, others get their type."""
    if isinstance(exc, PipekitError):
        return str(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM for the block (main thread only), then hand each one
    caught to the handler it would have reached (Ctrl-C: KeyboardInterrupt; SIGTERM's
    default: the process ends), so ending the MLflow runs is never cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
    except ValueError:  # not allowed here (embedded interpreter)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(caught):  # each signal once, in the order they came
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


# --- the observer -----------------------------------------------------------------------


class MlflowObserver(Observer):
    """Logs pipeline runs to MLflow. After a run: `parent_run_id`, `stage_runs`, `versions`.

    It never asks for cached outputs: metrics of a cached stage come from its cache
    manifest, its model version from the registry (tagged with the cache key), and only a
    cached model stage without any version loads its output, on the writer thread.
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
        self.failures: list[str] = []
        self._writer: _Writer | None = None
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

    def __repr__(self) -> str:
        return f"<MlflowObserver {self.uri!r} experiment={self.experiment!r}>"

    # hooks: called in the driver; they only queue work for the writer thread

    def run_started(self, run: RunInfo) -> None:
        self._close_writer()
        self._run = run
        self.parent_run_id, self.experiment_id = None, None
        self.stage_runs, self.versions, self.failures = {}, {}, []
        self._artifact_uris, self._open, self._closed = {}, {}, set()
        self._broken = set()
        self._parent_metrics = {}
        self._ancestors = {}
        self._order = list(run.stages)
        self._hash = config_hash(run.spec.config)
        self._examples = StageExamples(run.spec)  # input examples from the serve section
        self._secrets = set()  # found by the writer thread: the driver does not wait
        self._writer = _Writer(f"pipekit-mlflow-{run.run_id[:8]}", self.uri)
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

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            finally:
                self.failures.extend(writer.failures)

    # writer-thread work ---------------------------------------------------------------

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
            "mlflow.runName": f"{pipeline.name}-{run.run_id[:8]}",
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
        child = self.client.create_run(self.experiment_id, start_time=started_ms, tags=tags)
        self.stage_runs[stage] = child.info.run_id
        self._artifact_uris[stage] = child.info.artifact_uri
        self._open[stage] = started_ms

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
        client = self.client
        metrics: dict[str, float] = {}
        if event.duration is not None:
            metrics["duration_s"] = float(event.duration)
            self._parent_metrics[f"{stage}.duration_s"] = float(event.duration)
        if passed:
            for name, value in self._metrics(event, meta, spec.metrics).items():
                metrics[name] = value
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
        try:
            log_batch(client, run_id, params=params, metrics=metrics, tags=tags)
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
                self._examples.add(stage, load=event.meta.get("load"))
                return name, found[0], found[1]
        output = event.output
        if event.state == "cached":  # no version yet (e.g. tracked for the first time)
            load = event.meta.get("load") if isinstance(event.meta, Mapping) else None
            if load is None:
                raise ValueError("the cached output is not available to log")
            output = load()
        example = self._examples.input_for(stage, output)  # None: logged without signature
        flavor = log_model(client, run_id, self._artifact_uris[stage], output, example)
        tags = {
            tag.PIPELINE: run.name,
            tag.STAGE: stage,
            tag.PARENT_RUN_ID: self.parent_run_id or "",
            tag.RUN_ID: run.run_id,
            tag.CONFIG_HASH: self._hash,
            tag.FLAVOR: flavor,
        }
        if cache_key:
            tags[tag.CACHE_KEY] = str(cache_key)
        for upstream, (model, version) in self._upstream_versions(stage).items():
            tags[tag.upstream(upstream)] = f"{model}/{version}"
        source = f"{self._artifact_uris[stage].rstrip('/')}/model"
        created = register(client, name, source, run_id, tags, run.spec.stages[stage])
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

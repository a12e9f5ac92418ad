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
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TrackingConfigError, did_you_mean, where
from .events import Observer, RunInfo, StageEvent, count_states
from .fingerprint import digest
from .flavors import quiet, save_model
from .metrics import numeric_items
from .provenance import Lineage, lineage
from .spec import backend_name, flat_params

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .result import RunResult

__all__ = [
    "BACKENDS",
    "Lineage",
    "MlflowObserver",
    "TrackingSettings",
    "config_hash",
    "flatten_params",
    "git_commit",
    "lineage",
    "observer_from_config",
    "save_model",
    "settings_from_config",
]

log = logging.getLogger(__name__)

BACKENDS = ("local", "server", "off")
#: Keys of the `tracking` config section, with a one-line meaning (used in errors).
SETTINGS_KEYS = {
    "backend": "local | server | off",
    "uri": "tracking URI (sqlite:///mlflow.db, http://host:5000, ...)",
    "experiment": "experiment name; null means the pipeline name",
    "artifacts": "artifact root for new experiments; null means the backend's default",
    "enabled": "false to switch tracking off without changing the backend",
    "wal": "SQLite only: write-ahead log, no fsync per commit (false on network drives)",
}
DEFAULT_URIS = {"local": "sqlite:///mlflow.db", "server": "http://127.0.0.1:5000"}

#: MLflow's limits (params per batch, tag/param value length) with some room.
_BATCH = 100
_MAX_VALUE = 5000
_TAG = "pipekit."


# --- settings ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrackingSettings:
    """The validated `tracking` section."""

    backend: str
    uri: str
    experiment: str
    artifacts: str | None = None
    wal: bool = True


def settings_from_config(pipeline: str, section: Mapping[str, Any]) -> TrackingSettings:
    """Validate the `tracking` section; raise TrackingConfigError naming the bad key."""
    for key in section:
        if key not in SETTINGS_KEYS:
            raise TrackingConfigError(
                f"{where(pipeline, key=f'tracking.{key}')} is not a tracking setting"
                f"{did_you_mean(str(key), SETTINGS_KEYS)}; known: {', '.join(SETTINGS_KEYS)}"
            )
    backend = backend_name(section, "off")
    if backend not in BACKENDS:
        raise TrackingConfigError(
            f"{where(pipeline, key='tracking.backend')} '{backend}' is unknown"
            f"{did_you_mean(str(backend), BACKENDS)}; use one of {', '.join(BACKENDS)} "
            f"(e.g. `tracking=local`)"
        )
    uri = section.get("uri") or DEFAULT_URIS.get(backend, "")
    if not isinstance(uri, str):
        raise TrackingConfigError(
            f"{where(pipeline, key='tracking.uri')} must be a string, got {type(uri).__name__}"
        )
    if backend == "server" and not uri.startswith(("http://", "https://", "databricks")):
        raise TrackingConfigError(
            f"{where(pipeline, key='tracking.uri')} '{uri}' is not a server URI; the server "
            f"backend needs http(s)://host:port, e.g. `tracking.uri=http://127.0.0.1:5000` "
            f"(use `tracking=local` for a local store)"
        )
    if backend == "local" and uri.startswith(("http://", "https://")):
        raise TrackingConfigError(
            f"{where(pipeline, key='tracking.uri')} '{uri}' is a server URI; use "
            f"`tracking=server tracking.uri={uri}`"
        )
    experiment = section.get("experiment") or pipeline
    if not isinstance(experiment, str):
        raise TrackingConfigError(
            f"{where(pipeline, key='tracking.experiment')} must be a string, "
            f"got {type(experiment).__name__}"
        )
    uri = _absolute_sqlite(uri)  # a notebook may chdir between runs
    artifacts = section.get("artifacts") or None
    if artifacts is None and backend == "local":
        artifacts = _local_artifacts(uri)
    wal = section.get("wal", True)
    if not isinstance(wal, bool):
        raise TrackingConfigError(
            f"{where(pipeline, key='tracking.wal')} must be true or false, got {wal!r}"
        )
    return TrackingSettings(backend, uri, experiment, artifacts, wal)


def observer_from_config(pipeline: Pipeline, section: Mapping[str, Any]) -> MlflowObserver | None:
    """The tracking observer a pipeline's `tracking` section asks for (None when off)."""
    settings = settings_from_config(pipeline.name, section)
    if settings.backend == "off" or section.get("enabled", True) is False:
        return None
    return MlflowObserver(
        settings.uri,
        experiment=settings.experiment,
        artifacts=settings.artifacts,
        sqlite_wal=settings.wal,
    )


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///relative.db` resolved against the current directory, now."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return uri
    path, sep, query = uri[len("sqlite:///") :].partition("?")
    if Path(path).expanduser().is_absolute():
        return uri
    return f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"


def _local_artifacts(uri: str) -> str | None:
    """`mlartifacts/` beside a SQLite database file, as a file URI."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0]).expanduser()
    return (path.resolve().parent / "mlartifacts").as_uri()


# --- small helpers ----------------------------------------------------------------------


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys (`train.C`), values as strings MLflow accepts."""
    return {name: _text(value) for name, value in flat_params(values, prefix).items()}


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


def _text(value: Any, limit: int = _MAX_VALUE) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(name: str) -> str:
    """A param or metric name MLflow accepts (letters, digits, `_ - . /` and spaces)."""
    return _BAD_KEY.sub("_", name)[:250]


_BAD_KEY = re.compile(r"[^\w\-. /]")


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- the writer thread ------------------------------------------------------------------


class _Writer:
    """One thread that performs MLflow calls in submission order; errors are logged, once."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.failures: list[str] = []
        self._thread.start()

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        self._queue.put((func, args))

    def close(self, grace: float = 30.0) -> None:
        """Run everything submitted, then stop the thread (waits for it).

        For `grace` seconds a second Ctrl-C waits too (then re-raises): it must not
        leave runs RUNNING. After that the wait can be interrupted as usual.
        """
        self._queue.put(None)
        with _sigint_deferred():
            self._thread.join(grace)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            func, args = item
            try:
                func(*args)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                self.failures.append(message)
                debug = log.isEnabledFor(logging.DEBUG)
                log.warning("pipekit tracking: %s", message, exc_info=debug)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C for the block (main thread only), then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not allowed here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# --- the observer -----------------------------------------------------------------------


class MlflowObserver(Observer):
    """Logs pipeline runs to MLflow. After a run: `parent_run_id`, `stage_runs`, `versions`."""

    def __init__(
        self,
        uri: str,
        *,
        experiment: str | None = None,
        artifacts: str | None = None,
        log_models: bool = True,
        sqlite_wal: bool = True,
    ):
        self.uri = uri
        self.sqlite_wal = sqlite_wal
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
        self._hash = config_hash(run.pipeline.spec.config)
        self._writer = _Writer(f"pipekit-mlflow-{run.run_id[:8]}")
        self._writer.submit(self._start_parent, run, int(run.started * 1000))

    def stage_changed(self, event: StageEvent) -> None:
        if self._writer is None:
            return
        if event.state == "running":
            upstream = self._run.pipeline.stages[event.stage].upstream  # type: ignore[union-attr]
            if not any(name in self._broken for name in upstream):  # else it will be skipped
                self._writer.submit(self._open_stage, event.stage, _now_ms())
        elif event.state in ("failed", "skipped"):
            self._broken.add(event.stage)
        if event.state in ("done", "cached", "failed"):
            self._closed.add(event.stage)
            self._writer.submit(self._close_stage, event, _now_ms())

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
        if self.parent_run_id is not None:
            result.tracking.update(
                mlflow_uri=self.uri,
                mlflow_experiment_id=str(self.experiment_id),
                mlflow_run_id=self.parent_run_id,
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
            from mlflow import MlflowClient

            # MLflow creates a new SQLite store's tables at INFO level: not news to users
            with quiet("mlflow.store.db.utils"), quiet("alembic.runtime.migration"):
                client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                if self.uri.startswith("sqlite:"):
                    client._tracking_client.store  # noqa: B018  (creates the tables now)
                    if self.sqlite_wal:
                        _tune_sqlite(client)
            self._client = client
        return self._client

    def _start_parent(self, run: RunInfo, started_ms: int) -> None:
        pipeline = run.pipeline
        _check_reachable(self.uri)
        client = self.client
        self.experiment_id = _experiment_id(
            client, self.experiment or pipeline.name, self.artifacts
        )
        tags = {
            "mlflow.runName": f"{pipeline.name}-{run.run_id[:8]}",
            "mlflow.source.name": f"pipekit:{pipeline.name}",
            "mlflow.source.type": "LOCAL",
            f"{_TAG}pipeline": pipeline.name,
            f"{_TAG}run_id": run.run_id,
            f"{_TAG}config_hash": self._hash,
            f"{_TAG}executor": run.executor,
            f"{_TAG}stages": _text(",".join(run.stages)),
            f"{_TAG}overrides": _text(" ".join(run.overrides)),
        }
        description = pipeline.spec.config.get("description")
        if isinstance(description, str) and description:
            tags["mlflow.note.content"] = description
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags[f"{_TAG}git_commit"] = commit
        user = os.environ.get("USER") or os.environ.get("USERNAME")
        if user:
            tags["mlflow.user"] = user
        parent = client.create_run(self.experiment_id, start_time=started_ms, tags=tags)
        self.parent_run_id = parent.info.run_id
        params: dict[str, str] = {}
        for name in run.stages:
            params.update(flatten_params(pipeline.stages[name].params, f"{name}."))
        _log_batch(client, self.parent_run_id, params=params)
        where_to = parent.info.artifact_uri
        _log_text(
            client, self.parent_run_id, where_to, _config_yaml(pipeline.spec.config), "config.yaml"
        )
        svg = _dag_svg(pipeline)
        if svg:
            _log_text(client, self.parent_run_id, where_to, svg, "dag.svg")

    def _open_stage(
        self, stage: str, started_ms: int, extra: Mapping[str, str] | None = None
    ) -> None:
        if self.parent_run_id is None or stage in self.stage_runs:
            return
        run = self._run
        assert run is not None
        spec = run.pipeline.stages[stage]
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": stage,
            f"{_TAG}pipeline": run.pipeline.name,
            f"{_TAG}stage": stage,
            f"{_TAG}target": spec.target,
            f"{_TAG}run_id": run.run_id,
            **(extra or {}),
        }
        if spec.description:
            tags["mlflow.note.content"] = spec.description
        for upstream, (model, version) in self._upstream_versions(stage).items():
            tags[f"{_TAG}upstream.{upstream}"] = f"{model}/{version}"
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
        spec = run.pipeline.stages[stage]
        meta = event.meta if isinstance(event.meta, Mapping) else {}
        passed = event.state in ("done", "cached")
        tags: dict[str, str] = {}
        annotations: Mapping[str, Any] = {}
        if event.state == "cached":
            manifest = meta.get("manifest")
            found = manifest.get("annotations") if isinstance(manifest, Mapping) else None
            annotations = found if isinstance(found, Mapping) else {}
            tags[f"{_TAG}cache_hit"] = "true"
            if annotations.get("mlflow_run_id"):
                tags[f"{_TAG}cache_source_run"] = str(annotations["mlflow_run_id"])
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
            for key, value in numeric_items(event.output, spec.metrics or None).items():
                metrics[key] = value
                self._parent_metrics[f"{stage}.{key}"] = value
        else:
            error = event.error
            text = f"{type(error).__name__}: {error}" if error is not None else "failed"
            tags[f"{_TAG}error"] = _text(text)
            where_to = self._artifact_uris[stage]
            _log_text(client, run_id, where_to, event.traceback or text, "traceback.txt")
        model_version = None
        if passed and spec.model and self.log_models:
            try:
                model_version = self._model_version(stage, event.output, run_id, annotations)
                tags[f"{_TAG}model_version"] = f"{model_version[0]}/{model_version[1]}"
            except Exception as exc:  # e.g. an unpicklable output: the run still ends
                tags[f"{_TAG}model_error"] = _text(f"{type(exc).__name__}: {exc}")
                self._note_failure(f"{stage}: model not logged: {type(exc).__name__}: {exc}")
        if passed and spec.promote:
            try:
                promoted = self._promote(spec.promote, stage)
            except Exception as exc:
                promoted = []
                tags[f"{_TAG}promote_error"] = _text(f"{type(exc).__name__}: {exc}")
                self._note_failure(f"{stage}: promotion failed: {type(exc).__name__}: {exc}")
            if promoted:
                tags[f"{_TAG}promoted"] = _text(f"@{spec.promote}: {', '.join(promoted)}")
        params = flatten_params(spec.params, f"{stage}.")
        try:
            _log_batch(client, run_id, params=params, metrics=metrics, tags=tags)
        finally:  # a rejected value must not leave the run RUNNING
            client.set_terminated(run_id, "FINISHED" if passed else "FAILED", end_time=ended_ms)
            self._open.pop(stage, None)
        cache, key = run.cache, meta.get("cache_key")
        fresh = event.state == "done" or (model_version is not None and model_version[2])
        if cache is not None and key and fresh:
            note = {"mlflow_run_id": run_id, "mlflow_tracking_uri": self.uri}
            if model_version is not None:
                note.update(model_name=model_version[0], model_version=model_version[1])
            cache.annotate(key, note)

    def _upstream_versions(self, stage: str) -> dict[str, tuple[str, str]]:
        """Model stages upstream of `stage` (transitively) and the versions they produced."""
        if stage not in self._ancestors:
            graph = self._run.pipeline.graph  # type: ignore[union-attr]
            above = graph.upstream([stage]) - {stage}
            stages = self._run.pipeline.stages  # type: ignore[union-attr]
            self._ancestors[stage] = [n for n in self._order if n in above and stages[n].model]
        return {
            name: self.versions[name] for name in self._ancestors[stage] if name in self.versions
        }

    def _model_version(
        self, stage: str, output: Any, run_id: str, annotations: Mapping[str, Any]
    ) -> tuple[str, str, bool]:
        """Log and register the stage output (or reuse the cached version): (name, version, new)."""
        client = self.client
        name = f"{self._run.pipeline.name}.{stage}"  # type: ignore[union-attr]
        reused = _reusable_version(client, name, annotations, self.uri)
        if reused is not None:
            self.versions[stage] = (name, reused)
            return name, reused, False
        run = self._run
        assert run is not None
        flavor = _log_model(client, run_id, self._artifact_uris[stage], output)
        tags = {
            f"{_TAG}pipeline": self._run.pipeline.name,  # type: ignore[union-attr]
            f"{_TAG}stage": stage,
            f"{_TAG}parent_run_id": self.parent_run_id or "",
            f"{_TAG}run_id": self._run.run_id,  # type: ignore[union-attr]
            f"{_TAG}config_hash": self._hash,
            f"{_TAG}flavor": flavor,
        }
        for upstream, (model, version) in self._upstream_versions(stage).items():
            tags[f"{_TAG}upstream.{upstream}"] = f"{model}/{version}"
        source = f"{self._artifact_uris[stage].rstrip('/')}/model"
        created = _register(client, name, source, run_id, tags, run.pipeline.stages[stage])
        version = str(created.version)
        self.versions[stage] = (name, version)
        return name, version, True

    def _note_failure(self, message: str) -> None:
        log.warning("pipekit tracking: %s", message)
        self.failures.append(message)

    def _promote(self, alias: str, stage: str) -> list[str]:
        """Set `alias` on the versions of every model stage upstream of a passing stage."""
        promoted = []
        for model, version in self._upstream_versions(stage).values():
            self.client.set_registered_model_alias(model, alias, version)
            promoted.append(f"{model}/{version}")
        return promoted

    def _finish_parent(self, result: RunResult) -> None:
        if self.parent_run_id is None:
            return
        self._end_open_stages("KILLED", "the run ended before this stage finished")
        tags = {f"{_TAG}status": count_states(result.status.values())}
        skipped = [name for name, state in result.status.items() if state == "skipped"]
        if skipped:
            tags[f"{_TAG}skipped_stages"] = _text(",".join(skipped))
        if result.failed:
            tags[f"{_TAG}failed_stages"] = ",".join(result.failed)
            first = result.errors[result.failed[0]]
            tags[f"{_TAG}error"] = _text(str(first))
        status = "FAILED" if result.failed else "FINISHED"
        try:
            _log_batch(self.client, self.parent_run_id, metrics=self._parent_metrics, tags=tags)
        finally:
            self.client.set_terminated(self.parent_run_id, status, end_time=_now_ms())

    def _kill(self, error: BaseException) -> None:
        if self.parent_run_id is None:
            return
        interrupted = isinstance(error, KeyboardInterrupt)
        reason = "interrupted (Ctrl-C)" if interrupted else f"{type(error).__name__}: {error}"
        status = "KILLED" if interrupted else "FAILED"
        try:
            self._end_open_stages(status, reason)
            tags = {f"{_TAG}error": _text(reason)}
            _log_batch(self.client, self.parent_run_id, metrics=self._parent_metrics, tags=tags)
        finally:
            self.client.set_terminated(self.parent_run_id, status, end_time=_now_ms())

    def _end_open_stages(self, status: str, reason: str) -> None:
        for stage in list(self._open):
            run_id = self.stage_runs[stage]
            self.client.set_tag(run_id, f"{_TAG}error", reason)
            self.client.set_terminated(run_id, status, end_time=_now_ms())
            self._open.pop(stage, None)


# --- MLflow helpers ---------------------------------------------------------------------


def _log_batch(
    client: Any,
    run_id: str,
    *,
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Everything in as few `log_batch` calls as MLflow's limits allow."""
    from mlflow.entities import Metric, Param, RunTag

    stamp = _now_ms()
    clean_p = {_key(k): v for k, v in (params or {}).items()}  # also drops clashes
    clean_m = {_key(k): v for k, v in (metrics or {}).items()}
    items_p = [Param(k, v) for k, v in clean_p.items()]
    items_m = [Metric(k, v, stamp, 0) for k, v in clean_m.items()]
    items_t = [RunTag(k, v) for k, v in (tags or {}).items()]
    while items_p or items_m or items_t:
        client.log_batch(
            run_id, metrics=items_m[:1000], params=items_p[:_BATCH], tags=items_t[:_BATCH]
        )
        items_p, items_m, items_t = items_p[_BATCH:], items_m[1000:], items_t[_BATCH:]


def _check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast when a tracking server does not answer at all.

    MLflow's HTTP client retries a refused connection for minutes; a pipeline run would
    wait that long at its end. Any HTTP answer (even 404) counts as reachable.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise ConnectionError(
            f"MLflow server {uri} is unreachable ({reason}); this run is not tracked "
            f"(start the server or use tracking=local)"
        ) from None


def _tune_sqlite(client: Any) -> None:
    """WAL journal and `synchronous=NORMAL` on MLflow's SQLite engines.

    MLflow commits several times per call; with the default rollback journal each
    commit waits for an fsync (~0.7 ms here), which is a third of a stage's tracking
    cost. In WAL mode a crash can lose the last commits but never corrupts the store.
    """
    from sqlalchemy import event

    stores = []
    for get in (lambda: client._tracking_client.store, lambda: client._get_registry_client().store):
        try:
            stores.append(get())
        except Exception:  # private MLflow internals moved: keep the defaults
            continue
    for store in stores:
        engine = getattr(store, "engine", None)
        if engine is None or engine.dialect.name != "sqlite" or engine in _TUNED:
            continue
        event.listen(engine, "connect", _sqlite_pragmas)
        engine.dispose()  # pooled connections reconnect with the pragmas
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        _TUNED.add(engine)


_TUNED: weakref.WeakSet[Any] = weakref.WeakSet()


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _experiment_id(client: Any, name: str, artifacts: str | None) -> str:
    """The id of experiment `name`, created (or restored from the bin) when needed."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if artifacts:  # one folder per experiment under the artifact root
            location = f"{artifacts.rstrip('/')}/{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise exc from None
    if found.lifecycle_stage == "deleted":
        log.warning("pipekit tracking: restoring deleted MLflow experiment %r", name)
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _log_model(client: Any, run_id: str, artifact_uri: str, output: Any) -> str:
    """Save `output` as the run's `model` artifact; the flavour used.

    A local artifact store gets the files written in place (atomically renamed into
    `model/`); other stores get them uploaded from a temporary directory.
    """
    local = _local_path(artifact_uri)
    if local is None:
        with tempfile.TemporaryDirectory(prefix="pipekit-model-") as tmp:
            flavor = save_model(output, os.path.join(tmp, "model"))
            client.log_artifacts(run_id, os.path.join(tmp, "model"), "model")
        return flavor
    os.makedirs(local, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=local)
    try:
        flavor = save_model(output, os.path.join(tmp, "model"))
        os.replace(os.path.join(tmp, "model"), os.path.join(local, "model"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return flavor


def _log_text(client: Any, run_id: str, artifact_uri: str, text: str, name: str) -> None:
    """`client.log_text`, written in place (atomically) when the artifact store is local."""
    local = _local_path(artifact_uri)
    if local is None:
        client.log_text(run_id, text, name)
        return
    os.makedirs(local, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=local)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from an `mlflow ui` run by others
    os.replace(tmp, os.path.join(local, name))


def _local_path(uri: str) -> str | None:
    """The directory of a `file:` (or plain path) artifact URI, else None."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return url2pathname(parsed.path)
    if parsed.scheme == "" and uri.startswith("/"):
        return uri
    return None


def _register(client: Any, name: str, source: str, run_id: str, tags: dict, stage: Any) -> Any:
    """A new version of registered model `name`, creating the model on first use."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_model_version(name, source, run_id=run_id, tags=tags)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description=stage.description or None)
    except MlflowException as exc:  # created meanwhile by another process
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source, run_id=run_id, tags=tags)


def _reusable_version(
    client: Any, name: str, annotations: Mapping[str, Any], uri: str
) -> str | None:
    """The registered version a cache entry names, when it is this model in this store."""
    if annotations.get("model_name") != name or not annotations.get("model_version"):
        return None
    if annotations.get("mlflow_tracking_uri", uri) != uri:
        return None
    version = str(annotations["model_version"])
    try:
        client.get_model_version(name, version)
    except Exception:
        return None
    return version


def _config_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    try:
        return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    except yaml.YAMLError:
        return json.dumps(config, indent=2, default=str)


def _dag_svg(pipeline: Pipeline) -> str | None:
    """The drawn DAG (viz keeps drawings, so re-runs skip `dot`), or None without Graphviz."""
    try:
        from .viz import render

        return str(render(pipeline, format="svg"))
    except Exception as exc:  # optional: tracking works without a drawing
        log.debug("pipekit tracking: no DAG drawing: %s", exc)
        return None

"""MLflow calls pipekit makes, each as few round-trips as MLflow allows: the client for a
store (SQLite tuned, servers checked), batches, artifacts written in place, registration."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import TrackingUnavailableError
from .flavors import quiet, save_model
from .settings import require_store, sqlite_file
from .tags import key_text

log = logging.getLogger(__name__)

#: MLflow's limits (params per batch, tag/param value length) with some room.
BATCH = 100
MAX_VALUE = 5000
#: How long a process waits for another one creating or migrating a local store.
LOCK_WAIT = 120.0
#: SQLite's wait for a write lock held by another process (ms) on every connection.
BUSY_TIMEOUT_MS = 30_000
#: MLflow's HTTP knobs for pipekit's own calls (a user's environment value wins): MLflow's
#: defaults retry a refused connection 7 times with exponential backoff (minutes).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def text(value: Any, limit: int = MAX_VALUE) -> str:
    """A tag or param value MLflow accepts: JSON for non-strings, cut at MLflow's limit."""
    shown = value if isinstance(value, str) else json.dumps(value, default=str)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def key(name: str) -> str:
    """A param or metric name MLflow accepts (letters, digits, `_ - . / :` and spaces);
    matrix members read `train/region:eu/model:logreg.C`."""
    return _BAD_KEY.sub("_", key_text(name))[:250]


_BAD_KEY = re.compile(r"[^\w\-. /:]")


def now_ms() -> int:
    return int(time.time() * 1000)


def log_batch(
    client: Any,
    run_id: str,
    *,
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    model_metrics: Mapping[str, float] | None = None,
    model_ids: Sequence[str] = (),
) -> None:
    """Everything in as few `log_batch` calls as MLflow's limits allow.

    `model_metrics` are run metrics too, and also metrics of each logged model in
    `model_ids` (MLflow 3: they show beside the model in the experiment's Models tab).
    """
    from mlflow.entities import Metric, Param, RunTag

    stamp = now_ms()
    clean_p = {key(k): v for k, v in (params or {}).items()}  # also drops clashes
    linked = {key(k): v for k, v in (model_metrics or {}).items()}  # these win a clash
    clean_m = {key(k): v for k, v in (metrics or {}).items() if key(k) not in linked}
    items_p = [Param(k, v) for k, v in clean_p.items()]
    items_m = [Metric(k, v, stamp, 0) for k, v in clean_m.items()]
    for name, value in linked.items():
        for model_id in model_ids or [None]:  # MLflow keeps one run metric of equal copies
            items_m.append(Metric(name, value, stamp, 0, model_id=model_id))
    items_t = [RunTag(k, v) for k, v in (tags or {}).items()]
    while items_p or items_m or items_t:
        client.log_batch(
            run_id, metrics=items_m[:1000], params=items_p[:BATCH], tags=items_t[:BATCH]
        )
        items_p, items_m, items_t = items_p[BATCH:], items_m[1000:], items_t[BATCH:]


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer at all.

    MLflow's HTTP client retries a refused connection for minutes; a pipeline run would
    wait that long at its end. Any HTTP answer (even 404) counts as reachable.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    from ..core.redact import scrub

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.exceptions.SSLError:  # something answers TLS: MLflow's own settings
        return  # (MLFLOW_TRACKING_SERVER_CERT_PATH, ...) decide whether it is trusted
    except requests.RequestException as exc:
        if isinstance(exc, requests.Timeout):
            reason = f"no answer in {timeout:g} s"
        elif "refused" in str(exc).lower():
            reason = "connection refused"
        else:
            reason = type(exc).__name__
        raise TrackingUnavailableError(
            f"MLflow server {scrub(uri)} is unreachable ({reason}); start the server, or "
            f"check the URI (tracking.uri, --uri or MLFLOW_TRACKING_URI)"
        ) from None


@contextmanager
def http_limits() -> Iterator[None]:
    """MLflow's HTTP timeout and retries bounded (`HTTP_LIMITS`) while pipekit calls it.

    The variables are set only when the user has not set them, and removed again when the
    last pipekit caller (writer threads, lineage) leaves: a user's own MLflow calls outside
    a run keep MLflow's defaults.
    """
    global _http_users
    with _http_lock:
        if _http_users == 0:
            _http_set.clear()
            for name, value in HTTP_LIMITS.items():
                if name not in os.environ:
                    os.environ[name] = value
                    _http_set.append(name)
        _http_users += 1
    try:
        yield
    finally:
        with _http_lock:
            _http_users -= 1
            if _http_users == 0:
                for name in _http_set:
                    if os.environ.get(name) == HTTP_LIMITS[name]:
                        del os.environ[name]
                _http_set.clear()


_http_lock = threading.Lock()
_http_users = 0
_http_set: list[str] = []


@contextmanager
def store_lock(db: Path, wait: float | None = None) -> Iterator[None]:
    """Hold `<db>.lock` (an exclusive `flock` beside the database) for the block.

    MLflow creates a new SQLite store's tables with a migration that is not safe when two
    processes run it at once (duplicate columns, `_alembic_tmp_*` tables, a store broken
    for good). Under this lock one process creates and migrates; the others wait, then
    find the tables at head. The kernel drops the lock when its holder dies, so a crashed
    run never blocks the next one. Without `fcntl` (Windows) or a writable directory the
    block runs unlocked, as MLflow alone would.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = db.with_name(f"{db.name}.lock")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        log.debug("pipekit tracking: no store lock %s (%s); opening unlocked", lock, exc)
        fd = None
    if fd is None:
        yield
        return
    wait = LOCK_WAIT if wait is None else wait
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TrackingUnavailableError(
                        f"MLflow store sqlite:///{db}: another process has held its lock "
                        f"{lock} for {wait:g} s (creating or migrating the store); find it "
                        f"with `fuser {lock}`, or stop it and run again"
                    ) from None
                time.sleep(0.05)
            except OSError as exc:  # a file system without flock (some network drives)
                log.debug("pipekit tracking: cannot lock %s (%s); opening unlocked", lock, exc)
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def tune_sqlite(client: Any) -> None:
    """WAL journal, `synchronous=NORMAL` and a busy timeout on MLflow's SQLite engines.

    MLflow commits several times per call; with the default rollback journal each
    commit waits for an fsync (~0.7 ms here), which is a third of a stage's tracking
    cost. In WAL mode a crash can lose the last commits but never corrupts the store.
    """
    from sqlalchemy import event

    for engine in _engines(client):
        if engine in _TUNED:
            continue
        event.listen(engine, "connect", _sqlite_pragmas)
        engine.dispose()  # pooled connections reconnect with the pragmas
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        _TUNED.add(engine)


def _stores(client: Any) -> list[Any]:
    """The client's tracking and registry stores, created now (MLflow makes them lazily)."""
    stores = []
    for get in (lambda: client._tracking_client.store, lambda: client._get_registry_client().store):
        try:
            stores.append(get())
        except AttributeError:  # private MLflow internals moved: MLflow creates them later
            continue
    return stores


def _engines(client: Any) -> list[Any]:
    """The SQLite engines behind the client's stores, each once."""
    found: list[Any] = []
    for store in _stores(client):
        engine = getattr(store, "engine", None)
        if engine is not None and engine.dialect.name == "sqlite" and engine not in found:
            found.append(engine)
    return found


_TUNED: weakref.WeakSet[Any] = weakref.WeakSet()


def close_engines(client: Any) -> None:
    """Close the pooled connections of the client's SQLite stores (they reopen on use)."""
    for engine in _engines(client):
        engine.dispose()


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def _busy_timeout(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def experiment_id(client: Any, name: str, artifacts: str | None) -> str:
    """The id of experiment `name`, created (or restored from the bin) when needed, of
    the "Model training" kind (`mlflow.experimentKind`) unless someone chose another."""
    from mlflow.exceptions import MlflowException

    from . import tags as tag

    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if artifacts:  # one folder per experiment under the artifact root
            location = f"{artifacts.rstrip('/')}/{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"
        try:
            kind = {tag.EXPERIMENT_KIND: tag.TRAINING}  # the UI's "Model training" view
            return client.create_experiment(name, artifact_location=location, tags=kind)
        except MlflowException as exc:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise exc from None
    if found.lifecycle_stage == "deleted":
        log.warning("pipekit tracking: restoring deleted MLflow experiment %r", name)
        client.restore_experiment(found.experiment_id)
    if tag.EXPERIMENT_KIND not in (found.tags or {}):  # made before pipekit set it; a kind
        client.set_experiment_tag(found.experiment_id, tag.EXPERIMENT_KIND, tag.TRAINING)
    return found.experiment_id


def log_model(
    client: Any,
    run_id: str,
    experiment: str,
    name: str,
    output: Any,
    *,
    input_example: Any = None,
    candidates: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> tuple[str, Any]:
    """`output` as an MLflow 3 logged model of `experiment` made by run `run_id` (it shows
    in the experiment's Models tab and as the run's output); (flavour, the LoggedModel).

    The model is created PENDING, saved (`flavors.save_model`: signature and input example
    from `input_example` or `candidates`), and READY once its files are all there; FAILED
    when saving fails (the error is raised). A local artifact store gets the files written
    in place (atomically renamed into the model's `artifacts/`); other stores get them
    uploaded from a temporary directory.
    """

    def save(path: str, meta: Any) -> str:
        return save_model(output, path, input_example, candidates=candidates, mlflow_model=meta)

    return log_saved_model(client, run_id, experiment, name, save, tags=tags, params=params)


def log_saved_model(
    client: Any,
    run_id: str,
    experiment: str,
    name: str,
    save: Callable[[str, Any], str],
    *,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> tuple[str, Any]:
    """A logged model of `experiment` made by run `run_id` whose files `save(path,
    mlflow_model)` writes (an MLflow model directory at `path`, with `mlflow_model` as its
    MLmodel; it returns the flavour); (flavour, the LoggedModel). `log_model` for a stage
    output; `pipekit export mlflow` for the inference DAG's pyfunc. PENDING, then READY
    (FAILED when `save` raises, the error re-raised), atomic as `log_model` says.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    model = client.create_logged_model(
        experiment,
        name=_model_name(name),
        source_run_id=run_id,
        tags=dict(tags or {}),
        params={key(k): v for k, v in (params or {}).items()} or None,
    )
    meta = Model(
        artifact_path=model.artifact_location,
        run_id=run_id,
        model_uuid=model.model_id,
        model_id=model.model_id,
    )
    try:
        flavor = _save_logged(client, model, save, meta)
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, "FAILED")
        except Exception as exc:  # the save error says more
            log.debug("pipekit tracking: cannot mark %s FAILED: %s", model.model_id, exc)
        raise
    model = client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return flavor, model


def _save_logged(client: Any, model: Any, save: Callable[[str, Any], str], meta: Any) -> str:
    """Save the model (`save`) into the logged model's artifact location; the flavour."""
    local = local_path(model.artifact_location)
    if local is None:
        with tempfile.TemporaryDirectory(prefix="pipekit-model-") as tmp:
            where = os.path.join(tmp, "model")
            flavor = save(where, meta)
            client.log_model_artifacts(model.model_id, where)
        return flavor
    parent = os.path.dirname(local.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=parent)
    try:
        where = os.path.join(tmp, "model")
        flavor = save(where, meta)
        os.replace(where, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return flavor


def _model_name(name: str) -> str:
    """A logged model's name MLflow accepts (no `/ : . % " '`)."""
    return re.sub(r"[/:.%\"']", "_", name)[:250] or "model"


def log_text(client: Any, run_id: str, artifact_uri: str, content: str, name: str) -> None:
    """`client.log_text`, written in place (atomically) when the artifact store is local."""
    local = local_path(artifact_uri)
    if local is None:
        client.log_text(run_id, content, name)
        return
    os.makedirs(local, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=local)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(content)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from an `mlflow ui` run by others
    os.replace(tmp, os.path.join(local, name))


def local_path(uri: str) -> str | None:
    """The directory of a `file:` (or plain path) artifact URI, else None."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return url2pathname(parsed.path)
    if parsed.scheme == "" and uri.startswith("/"):
        return uri
    return None


def register(
    client: Any,
    name: str,
    source: str,
    run_id: str,
    tags: dict,
    stage: Any,
    model: Any = None,
) -> Any:
    """A new version of registered model `name`, creating the model on first use.

    With `model` (an MLflow 3 LoggedModel, `source` its artifact location) the version
    points at that model: its source reads `models:/<model_id>` (MLflow's UI links the
    version to the model), and the model lists the version (`mlflow.modelVersions`). No
    call waits for the version to become READY (MLflow's own stores create it READY; the
    wait only logs "Waiting up to 300 seconds ...").
    """
    from mlflow.exceptions import MlflowException

    model_id = model.model_id if model is not None else None
    server = _is_server(client)
    if model_id and server:  # the server resolves the model itself and lists the version
        source = f"models:/{model_id}"

    def create() -> Any:
        return client.create_model_version(
            name, source, run_id=run_id, tags=tags, await_creation_for=0, model_id=model_id
        )

    try:
        created = create()
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description=stage.description or None)
        except MlflowException as exc:  # created meanwhile by another process
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        created = create()
    if model is not None and not server:
        _point_at_model(client, created, model)
    return created


def _is_server(client: Any) -> bool:
    uri = getattr(client, "_registry_uri", "") or ""
    return uri.startswith(("http://", "https://", "databricks"))


def _point_at_model(client: Any, version: Any, model: Any) -> None:
    """What an MLflow server does when it registers `models:/<model_id>`, done here for a
    store pipekit opens itself: the version's source becomes `models:/<model_id>` (its
    storage location stays the model's files) and the logged model lists the version.

    MLflow's SQL store would do the first itself, but looks the model up through the
    process-wide tracking URI (not the client's), so pipekit registers from the location
    and sets the source in the same store. Failing here leaves a usable version without
    the link (logged at debug).
    """
    from . import tags as tag

    model_id = model.model_id
    try:
        store = client._get_registry_client().store
        with store.ManagedSessionMaker(read_only=False) as session:
            row = store._get_sql_model_version(session, version.name, str(version.version))
            row.source = f"models:/{model_id}"
    except Exception as exc:
        log.debug("pipekit tracking: version source stays its location: %s", exc)
    try:
        listed = json.loads((model.tags or {}).get(tag.MODEL_VERSIONS, "[]"))
        entry = {"name": version.name, "version": int(version.version)}  # as a server writes
        if not any(_same(item, version.name, str(version.version)) for item in listed):
            value = {tag.MODEL_VERSIONS: json.dumps([*listed, entry])}
            service = getattr(client, "_tracking_client", None)  # without the client's
            setter = getattr(service, "set_logged_model_tags", client.set_logged_model_tags)
            setter(model_id, value)  # look-up first: `model` is the one just logged
    except Exception as exc:
        log.debug("pipekit tracking: %s does not list its version: %s", model_id, exc)


def _same(item: Any, name: str, version: str) -> bool:
    """Whether an entry of `mlflow.modelVersions` names version `name`/`version`."""
    return isinstance(item, dict) and (item.get("name"), str(item.get("version"))) == (
        name,
        version,
    )


_MODEL_SOURCE = re.compile(r"^models:/(m-[0-9a-f]+)$")


def model_id_of(version: Any) -> str | None:
    """The logged model a registered version was made from (its `model_id`, its
    `models:/<id>` source, or pipekit's `pipekit.model_id` tag), or None."""
    from . import tags as tag

    found = getattr(version, "model_id", None)
    if found:
        return str(found)
    matched = _MODEL_SOURCE.match(getattr(version, "source", "") or "")
    if matched:
        return matched.group(1)
    return (getattr(version, "tags", None) or {}).get(tag.MODEL_ID) or None


def forget_version(client: Any, found: Any) -> None:
    """Delete registered version `found` (a ModelVersion), and keep its logged model
    consistent: the version leaves the model's `mlflow.modelVersions`; a model no version
    lists any more is deleted too (as MLflow deletes: hidden, its files kept until
    `mlflow gc`)."""
    from . import tags as tag

    name, version = found.name, str(found.version)
    model_id = model_id_of(found)
    client.delete_model_version(name, version)
    if not model_id:
        return
    try:
        model = client.get_logged_model(model_id)
        listed = json.loads(model.tags.get(tag.MODEL_VERSIONS, "[]"))
        left = [item for item in listed if not _same(item, name, version)]
        if left:
            client.set_logged_model_tags(model_id, {tag.MODEL_VERSIONS: json.dumps(left)})
        else:
            client.delete_logged_model(model_id)
    except Exception as exc:  # the version is gone either way
        log.debug("pipekit tracking: logged model %s left as it was: %s", model_id, exc)


def version_for_cache_key(
    client: Any, name: str, cache_key: str
) -> tuple[str, str, str | None] | None:
    """The newest version of registered model `name` made from cache entry `cache_key`,
    as (version, run id, logged model id): a cached stage links to it instead of
    registering a copy."""
    from mlflow.exceptions import MlflowException

    from . import tags as tag

    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.`{tag.CACHE_KEY}` = '{cache_key}'",
            max_results=1,
            order_by=["version_number DESC"],
        )
    except MlflowException:
        return None
    if not found:
        return None
    return str(found[0].version), found[0].run_id or "", model_id_of(found[0])


def existing_client(uri: str, error: type[Exception], then: str) -> Any:
    """A client on a store that must exist already (`settings.require_store`), failing
    in seconds when a server does not answer (TrackingUnavailableError naming it)."""
    require_store(uri, error, then)
    check_reachable(uri)
    return client_for(uri)


def client_for(uri: str, *, sqlite_wal: bool = True) -> Any:
    """An MlflowClient for tracking and registry at `uri`.

    A SQLite store is opened under `store_lock`: a new one gets its tables created (and
    migrated to MLflow's head) by exactly one process while the others wait, quietly
    (MLflow announces the migration at INFO level).
    """
    from mlflow import MlflowClient

    db = sqlite_file(uri)
    if db is None:
        return _no_url_prints(MlflowClient(tracking_uri=uri, registry_uri=uri))
    _import_stores()  # seconds of imports outside the lock; under it only table work
    with store_lock(db), quiet("mlflow.store.db.utils"), quiet("alembic.runtime.migration"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates the tables
        _stores(client)  # both stores now, tables migrated to MLflow's head
        if sqlite_wal:
            tune_sqlite(client)
        else:
            _wait_when_busy(client)
    return client


def _no_url_prints(client: Any) -> Any:
    """`client` without MLflow's `🏃 View run ... / 🧪 View experiment ...` lines on stdout:
    a server client prints them (after a `get_run` round trip) whenever it ends a run.
    They go to the debug log; `pipekit run` closes with its own links (`ui_links`)."""
    service = getattr(client, "_tracking_client", None)
    if service is not None and hasattr(service, "_log_url"):
        service._log_url = _url_to_debug_log
    return client


def _url_to_debug_log(run_id: str) -> None:
    log.debug("pipekit tracking: MLflow run %s ended", run_id)


#: The query that opens MLflow 3's UI in its "Model training" view (else it may pick GenAI).
TRAINING_VIEW = "workflowType=machine_learning"


def ui_links(base: str, experiment: str, run: str) -> tuple[str, str]:
    """(the experiment's runs table, the run's page) in the MLflow UI at `base`, both in
    the "Model training" view (`TRAINING_VIEW`)."""
    root = f"{base.rstrip('/')}/#/experiments/{experiment}/runs"
    return f"{root}?{TRAINING_VIEW}", f"{root}/{run}?{TRAINING_VIEW}"


#: Where `mlflow ui --backend-store-uri <store>` serves a store that is no server.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_base(uri: str) -> str | None:
    """The MLflow UI of tracking store `uri` when it is a server (the server itself), else
    None: a local store is browsed with `mlflow ui --backend-store-uri <uri>` (`LOCAL_UI`)."""
    return uri if uri.startswith(("http://", "https://")) else None


def _import_stores() -> None:
    import importlib

    for module in (
        "mlflow.store.tracking.sqlalchemy_store",
        "mlflow.store.model_registry.sqlalchemy_store",
    ):
        try:
            importlib.import_module(module)
        except ImportError:  # moved in another MLflow: it is imported under the lock then
            log.debug("pipekit tracking: no module %s", module)


def _wait_when_busy(client: Any) -> None:
    """SQLite's busy timeout on the store's engines (without WAL's other pragmas)."""
    from sqlalchemy import event

    for engine in _engines(client):
        if engine not in _TUNED:
            event.listen(engine, "connect", _busy_timeout)
            engine.dispose()
            _TUNED.add(engine)


def versions_by_cache_key(client: Any, page: int = 1000) -> dict[str, str]:
    """Cache key -> `model/version` of every registered version pipekit tagged with one."""
    from . import tags as tag

    uri = getattr(client, "_registry_uri", "") or ""
    check_reachable(uri)
    found: dict[str, str] = {}
    token = None
    with http_limits():
        for _ in range(100_000):  # bounded: at most 10^8 versions
            batch = client.search_model_versions(max_results=page, page_token=token)
            for version in batch:
                key_ = (version.tags or {}).get(tag.CACHE_KEY)
                if key_:
                    found.setdefault(key_, f"{version.name}/{version.version}")
            token = getattr(batch, "token", None)
            if not token:
                break
    return found


def run_for_cache_key(client: Any, experiment: str, cache_key: str) -> str | None:
    """The stage run that computed cache entry `cache_key` (the first run tagged with it)."""
    from . import tags as tag

    found = client.search_runs(
        [experiment],
        filter_string=f"tags.`{tag.CACHE_KEY}` = '{cache_key}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return found[0].info.run_id if found else None

"""MLflow calls pipekit makes, each as few round-trips as MLflow allows: the client for a
store (SQLite tuned, servers checked), batches, artifacts written in place, registration."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping
from typing import Any

from .flavors import quiet, save_model

log = logging.getLogger(__name__)

#: MLflow's limits (params per batch, tag/param value length) with some room.
BATCH = 100
MAX_VALUE = 5000


def text(value: Any, limit: int = MAX_VALUE) -> str:
    """A tag or param value MLflow accepts: JSON for non-strings, cut at MLflow's limit."""
    shown = value if isinstance(value, str) else json.dumps(value, default=str)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def key(name: str) -> str:
    """A param or metric name MLflow accepts (letters, digits, `_ - . /` and spaces)."""
    return _BAD_KEY.sub("_", name)[:250]


_BAD_KEY = re.compile(r"[^\w\-. /]")


def now_ms() -> int:
    return int(time.time() * 1000)


def log_batch(
    client: Any,
    run_id: str,
    *,
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Everything in as few `log_batch` calls as MLflow's limits allow."""
    from mlflow.entities import Metric, Param, RunTag

    stamp = now_ms()
    clean_p = {key(k): v for k, v in (params or {}).items()}  # also drops clashes
    clean_m = {key(k): v for k, v in (metrics or {}).items()}
    items_p = [Param(k, v) for k, v in clean_p.items()]
    items_m = [Metric(k, v, stamp, 0) for k, v in clean_m.items()]
    items_t = [RunTag(k, v) for k, v in (tags or {}).items()]
    while items_p or items_m or items_t:
        client.log_batch(
            run_id, metrics=items_m[:1000], params=items_p[:BATCH], tags=items_t[:BATCH]
        )
        items_p, items_m, items_t = items_p[BATCH:], items_m[1000:], items_t[BATCH:]


def check_reachable(uri: str, timeout: float = 3.0) -> None:
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


def tune_sqlite(client: Any) -> None:
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


def experiment_id(client: Any, name: str, artifacts: str | None) -> str:
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


def log_model(client: Any, run_id: str, artifact_uri: str, output: Any) -> str:
    """Save `output` as the run's `model` artifact; the flavour used.

    A local artifact store gets the files written in place (atomically renamed into
    `model/`); other stores get them uploaded from a temporary directory.
    """
    local = local_path(artifact_uri)
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


def register(client: Any, name: str, source: str, run_id: str, tags: dict, stage: Any) -> Any:
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


def version_for_cache_key(client: Any, name: str, cache_key: str) -> tuple[str, str] | None:
    """The newest version of registered model `name` made from cache entry `cache_key`,
    as (version, run id): a cached stage links to it instead of registering a copy."""
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
    return (str(found[0].version), found[0].run_id or "") if found else None


def client_for(uri: str, *, sqlite_wal: bool = True) -> Any:
    """An MlflowClient for tracking and registry at `uri`; a new SQLite store's tables are
    created now (quietly: MLflow announces the migration at INFO level)."""
    from mlflow import MlflowClient

    with quiet("mlflow.store.db.utils"), quiet("alembic.runtime.migration"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if uri.startswith("sqlite:"):
            client._tracking_client.store  # noqa: B018  (creates the tables now)
            if sqlite_wal:
                tune_sqlite(client)
    return client


def versions_by_cache_key(client: Any, page: int = 1000) -> dict[str, str]:
    """Cache key -> `model/version` of every registered version pipekit tagged with one."""
    from . import tags as tag

    found: dict[str, str] = {}
    token = None
    while True:
        batch = client.search_model_versions(max_results=page, page_token=token)
        for version in batch:
            key_ = (version.tags or {}).get(tag.CACHE_KEY)
            if key_:
                found.setdefault(key_, f"{version.name}/{version.version}")
        token = getattr(batch, "token", None)
        if not token:
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

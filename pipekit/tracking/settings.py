"""The `tracking` section: which MLflow store, validated, with local paths made absolute."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.spec import backend_name
from ..errors import TrackingConfigError, did_you_mean, where

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
    uri = absolute_sqlite(uri)  # a notebook may chdir between runs
    artifacts = section.get("artifacts") or None
    if artifacts is None and backend == "local":
        artifacts = local_artifacts(uri)
    wal = section.get("wal", True)
    if not isinstance(wal, bool):
        raise TrackingConfigError(
            f"{where(pipeline, key='tracking.wal')} must be true or false, got {wal!r}"
        )
    return TrackingSettings(backend, uri, experiment, artifacts, wal)


def absolute_sqlite(uri: str) -> str:
    """`sqlite:///relative.db` resolved against the current directory, now."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return uri
    path, sep, query = uri[len("sqlite:///") :].partition("?")
    if Path(path).expanduser().is_absolute():
        return uri
    return f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"


def local_artifacts(uri: str) -> str | None:
    """`mlartifacts/` beside a SQLite database file, as a file URI."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0]).expanduser()
    return (path.resolve().parent / "mlartifacts").as_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (None for other stores and `:memory:`)."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0]).expanduser()


def default_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the local store of `tracking=local` in the cwd."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URIS["local"]

"""The `tracking` section: which MLflow store, validated, with local paths made absolute."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.sections import checked

#: The store each backend uses when `tracking.uri` is null (keys and checks: core.sections).
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
    #: `warn`: a run whose tracking failed says so and passes; `fail`: it fails (exit 1)
    on_error: str = "warn"


def settings_from_config(pipeline: str, section: Mapping[str, Any]) -> TrackingSettings:
    """Validate the `tracking` section (the shared schema in `core.sections`; it raises
    TrackingConfigError naming the bad key), then resolve its URIs."""
    values = checked(pipeline, "tracking", section)
    backend = values["backend"]
    uri = values["uri"] or DEFAULT_URIS.get(backend, "")
    uri = absolute_sqlite(uri)  # a notebook may chdir between runs
    artifacts = values["artifacts"] or None
    if artifacts is None and backend == "local":
        artifacts = local_artifacts(uri)
    return TrackingSettings(
        backend,
        uri,
        values["experiment"] or pipeline,
        artifacts,
        values["wal"],
        values.get("on_error", "warn"),
    )


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


def require_store(uri: str, error: type[Exception], then: str) -> None:
    """Raise `error` when `uri` is a SQLite store whose file does not exist, saying what
    to do (`then`): reading commands must not create an empty store as a side effect."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise error(f"no MLflow store at {uri} ({path.resolve()} does not exist); {then}")


def default_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the local store of `tracking=local` in the cwd."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URIS["local"]

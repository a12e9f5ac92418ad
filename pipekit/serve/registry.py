"""Which registered model versions the inference DAG applies, and which serving version
answers: read from the MLflow registry the training pipeline writes.

A stage's `version` is a number, an alias, `latest`, or unset: the version the latest
successful pipeline run produced. Unset versions follow the lineage of versions already
chosen (a pinned `train` v2 brings the `features` version it was trained on), and every
choice is checked against the others: a model is never served behind a transform it was
not trained with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.serving import ServeSpec
from ..core.spec import PipelineSpec, backend_name
from ..errors import ServeConfigError, ServingError, where
from ..tracking import tags as tag

#: How many versions of a stage model are searched for the latest successful run's.
SEARCH = 200


@dataclass(frozen=True, slots=True)
class Pin:
    """The registered version of training stage `stage` the inference DAG applies."""

    stage: str
    name: str
    version: str
    run_id: str
    #: how it was chosen: "version 3", "@champion", "latest", "latest successful run", ...
    chosen: str
    #: upstream training stage -> the version of its model this version was trained on
    upstream: Mapping[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


def tracking_uri(spec: PipelineSpec) -> str:
    """The MLflow URI of the pipeline's `tracking` section; a ServeConfigError when off."""
    from ..tracking.settings import settings_from_config

    section = spec.section("tracking")
    if backend_name(section, "off") == "off" or section.get("enabled", True) is False:
        raise ServeConfigError(
            f"{where(spec.name, key='tracking')} is off, but serving reads and writes the "
            f"MLflow model registry; use `tracking=local` (./mlflow.db) or "
            f"`tracking=server tracking.uri=http://host:5000`"
        )
    return settings_from_config(spec.name, section).uri


def open_client(uri: str) -> Any:
    """An MlflowClient on `uri`, failing with a ServingError when there is no store."""
    from ..tracking.client import existing_client

    return existing_client(
        uri,
        ServingError,
        "run the training pipeline with tracking first (`pipekit run`), or point "
        "tracking.uri at its store",
    )


def resolve_pins(
    client: Any, serve: ServeSpec, training_order: Iterable[str], prefer: str | None = None
) -> dict[str, Pin]:
    """The version of every model stage the DAG applies, consistent with each other.

    Explicit versions and aliases first, then unset ones downstream first, each taking
    the version alias `prefer` names (when given and set), else the version named by the
    lineage of a chosen one, else the latest successful run's.
    """
    wanted = serve.models
    users = {stage.model: name for name, stage in serve.stages.items() if stage.model}
    pins: dict[str, Pin] = {}
    for stage, version in wanted.items():
        if version is not None:
            pins[stage] = _explicit(client, serve, users[stage], stage, version)
    statuses: dict[str, str] = {}
    for stage in reversed([s for s in training_order if s in wanted]):
        if stage in pins:
            continue
        named = [p for p in pins.values() if stage in p.upstream]
        aliased = aliased_version(client, serve.registered(stage), prefer) if prefer else None
        if aliased is not None:
            pins[stage] = _pin(stage, aliased, f"@{prefer}")
        elif named:
            found = _get(client, serve, users[stage], stage, named[0].upstream[stage])
            pins[stage] = _pin(stage, found, f"trained with {named[0]}")
        else:
            pins[stage] = _latest_successful(client, serve, users[stage], stage, statuses)
    _check_together(serve, users, pins)
    return {stage: pins[stage] for stage in wanted}


def _explicit(client: Any, serve: ServeSpec, user: str, stage: str, version: int | str) -> Pin:
    from mlflow.exceptions import MlflowException

    name = serve.registered(stage)
    if isinstance(version, int):
        return _pin(stage, _get(client, serve, user, stage, str(version)), f"version {version}")
    if version == "latest":
        found = _versions(client, name, 1)
        if not found:
            raise _no_versions(serve, user, stage)
        return _pin(stage, client.get_model_version(name, found[0].version), "latest")
    try:
        return _pin(stage, client.get_model_version_by_alias(name, version), f"@{version}")
    except MlflowException:
        _versions_or_raise(client, serve, user, stage)
        raise ServingError(
            f"{_where(serve, user)} version '{version}': registered model '{name}' has no "
            f"alias '{version}'{_aliases(client, name)}; promote a version first (a stage "
            f"with `promote: {version}`), or set serve.stages.{user}.version to a number"
        ) from None


def _latest_successful(
    client: Any, serve: ServeSpec, user: str, stage: str, statuses: dict[str, str]
) -> Pin:
    name = serve.registered(stage)
    versions = _versions_or_raise(client, serve, user, stage)
    for found in versions:
        parent = (found.tags or {}).get(tag.PARENT_RUN_ID) or found.run_id
        if parent and parent not in statuses:
            try:
                statuses[parent] = client.get_run(parent).info.status
            except Exception:  # a deleted run: not a successful one
                statuses[parent] = "DELETED"
        if parent and statuses[parent] == "FINISHED":
            return _pin(
                stage, client.get_model_version(name, found.version), "latest successful run"
            )
    raise ServingError(
        f"{_where(serve, user)}: no version of '{name}' comes from a pipeline run that "
        f"finished successfully (newest: v{versions[0].version}); fix the run, or set "
        f"serve.stages.{user}.version to a number or an alias"
    )


def _check_together(serve: ServeSpec, users: Mapping[str, str], pins: Mapping[str, Pin]) -> None:
    """Every pinned version's upstream models are the pinned versions of those stages."""
    for pin in pins.values():
        for upstream, version in pin.upstream.items():
            other = pins.get(upstream)
            if other is not None and other.version != version:
                raise ServingError(
                    f"{_where(serve, users[pin.stage])} applies {pin} ({pin.chosen}), which was "
                    f"trained with {other.name} v{version}, but serve stage "
                    f"'{users[upstream]}' applies {other} ({other.chosen}); pin versions that "
                    f"were trained together (e.g. the same alias on both, or leave "
                    f"serve.stages.{users[upstream]}.version unset to follow the lineage)"
                )


def serving_version(client: Any, name: str, alias: str | None) -> tuple[str, str]:
    """The version of registered model `name` to serve and why: `@alias`, or the latest
    version while the alias is not set (or no alias is followed)."""
    from mlflow.exceptions import MlflowException

    if alias:
        try:
            return str(client.get_model_version_by_alias(name, alias).version), f"@{alias}"
        except MlflowException:
            pass  # no such alias (yet): serve the latest version
    found = _versions(client, name, 1)
    if not found:
        raise ServingError(
            f"registered model '{name}' has no versions to serve; export one first: "
            f"`pipekit export mlflow` (or Pipeline.export())"
        )
    return str(found[0].version), "latest"


def download(client: Any, uri: str, name: str, version: str, dst: str) -> str:
    """Registered model `name` at `version` copied into directory `dst`; its local path.

    Resolved through `client` (MLflow's `models:/` URIs would consult the process-wide
    registry URI, and create `./mlflow.db` when none is set).
    """
    import mlflow.artifacts

    source = client.get_model_version_download_uri(name, str(version))
    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=uri)


# --- helpers ------------------------------------------------------------------------------


def _where(serve: ServeSpec, user: str) -> str:
    return f"{where(serve.pipeline)}: serve stage '{user}'"


def _versions(client: Any, name: str, limit: int = SEARCH) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return list(
            client.search_model_versions(
                f"name = '{name}'", max_results=limit, order_by=["version_number DESC"]
            )
        )
    except MlflowException:
        return []


def _versions_or_raise(client: Any, serve: ServeSpec, user: str, stage: str) -> list[Any]:
    found = _versions(client, serve.registered(stage))
    if not found:
        raise _no_versions(serve, user, stage)
    return found


def _no_versions(serve: ServeSpec, user: str, stage: str) -> ServingError:
    return ServingError(
        f"{_where(serve, user)} model '{stage}': registered model '{serve.registered(stage)}' "
        f"has no versions; run the training pipeline with tracking first (`pipekit run`)"
    )


def _get(client: Any, serve: ServeSpec, user: str, stage: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    name = serve.registered(stage)
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        newest = _versions_or_raise(client, serve, user, stage)[0].version
        raise ServingError(
            f"{_where(serve, user)} version {version}: registered model '{name}' has no "
            f"version {version} (newest: {newest})"
        ) from None


def aliased_version(client: Any, name: str, alias: str) -> Any:
    """The version `alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _aliases(client: Any, name: str) -> str:
    try:
        aliases = sorted((client.get_registered_model(name).aliases or {}).keys())
    except Exception:
        return ""
    return f" (aliases: {', '.join(aliases)})" if aliases else " (it has no aliases)"


def _pin(stage: str, found: Any, chosen: str) -> Pin:
    tags = found.tags or {}
    upstream = {}
    for key, value in tags.items():
        if key.startswith(tag.UPSTREAM) and "/" in value:
            upstream[key[len(tag.UPSTREAM) :]] = value.rpartition("/")[2]
    return Pin(
        stage=stage,
        name=found.name,
        version=str(found.version),
        run_id=found.run_id or "",
        chosen=chosen,
        upstream=upstream,
    )

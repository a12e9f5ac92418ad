"""Lineage of registered model versions: the upstream versions and runs that produced one.

Tracking tags every version of `<pipeline>.<stage>` with `pipekit.upstream.<stage>` =
`<model>/<version>` for each upstream model stage; `lineage()` walks those tags back
through the MLflow registry and returns the chain as data, drawable with graphviz.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core.redact import scrub
from ..display.render import graphviz_module, pipe
from ..errors import GraphvizNotFoundError, TrackingError, did_you_mean
from . import tags as tag
from .settings import default_uri, require_store, sqlite_file


@dataclass(frozen=True, slots=True)
class VersionNode:
    """One registered model version and the runs that produced it."""

    model: str
    version: str
    run_id: str | None = None
    parent_run_id: str | None = None
    stage: str | None = None
    config_hash: str | None = None
    aliases: tuple[str, ...] = ()
    created: int | None = None
    #: the versions it consumed, as (model, version)
    upstream: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.model}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "stage": self.stage,
            "config_hash": self.config_hash,
            "aliases": list(self.aliases),
            "created": self.created,
            "upstream": [f"{m}/{v}" for m, v in self.upstream],
        }


@dataclass
class Lineage:
    """The version asked for (`root`) and every version upstream of it, upstream first."""

    root: str
    nodes: dict[str, VersionNode] = field(default_factory=dict)
    uri: str = ""

    def __iter__(self) -> Iterator[VersionNode]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, key: str) -> VersionNode:
        """A node by `model/version`, or by model name alone."""
        if key in self.nodes:
            return self.nodes[key]
        for node in self.nodes.values():
            if node.model == key:
                return node
        raise KeyError(
            f"{key!r} is not in the lineage of {self.root}; have {', '.join(self.nodes)}"
        )

    def edges(self) -> list[tuple[str, str]]:
        """(upstream, downstream) pairs, without edges implied by a longer path."""
        found = []
        for node in self.nodes.values():
            direct = {f"{m}/{v}" for m, v in node.upstream}
            implied = set()
            for key in direct:
                implied |= self._ancestors(key)
            found.extend((key, node.key) for key in sorted(direct - implied))
        return found

    def _ancestors(self, key: str) -> set[str]:
        seen: set[str] = set()
        stack = [key]
        while stack:
            node = self.nodes.get(stack.pop())
            for m, v in node.upstream if node else ():
                up = f"{m}/{v}"
                if up not in seen:
                    seen.add(up)
                    stack.append(up)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "uri": self.uri,
            "versions": [node.to_dict() for node in self.nodes.values()],
            "edges": [list(edge) for edge in self.edges()],
        }

    def __str__(self) -> str:
        lines = []
        for node in reversed(list(self.nodes.values())):
            aliases = "".join(f" @{a}" for a in node.aliases)
            runs = f"run {node.run_id}" if node.run_id else "no run"
            if node.parent_run_id:
                runs += f" (pipeline run {node.parent_run_id})"
            consumed = ", ".join(f"{m}/{v}" for m, v in node.upstream) or "-"
            lines.append(f"{node.model} v{node.version}{aliases}: {runs}; consumed {consumed}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Lineage of {self.root}: {len(self.nodes)} versions>"

    def draw(self) -> Any:
        """The lineage as a `graphviz.Digraph` (upstream at the top)."""
        graph = graphviz_module().Digraph(name="lineage", graph_attr={"rankdir": "TB"})
        graph.attr("node", shape="box", style="rounded,filled", fontname="Helvetica")
        for node in self.nodes.values():
            label = f"{node.model}\nv{node.version}"
            if node.aliases:
                label += "\n" + " ".join(f"@{a}" for a in node.aliases)
            if node.run_id:
                label += f"\nrun {node.run_id[:8]}"
            color = "#c8e6c9" if node.key == self.root else "#e3f2fd"
            graph.node(node.key, label, fillcolor=color)
        for upstream, downstream in self.edges():
            graph.edge(upstream, downstream)
        return graph

    def svg(self) -> bytes:
        """The drawing as SVG; GraphvizNotFoundError (saying how to install it) without Graphviz."""
        return pipe("dot", "svg", self.draw().source)

    def _repr_svg_(self) -> str | None:
        try:
            return self.svg().decode()
        except GraphvizNotFoundError:  # Jupyter shows the text instead
            return None


def lineage(model: str, version: str | int | None = None, *, uri: str | None = None) -> Lineage:
    """The chain of upstream model versions and runs behind `model` at `version`.

    `model` is `<pipeline>.<stage>`; `version` a number, an alias (`champion` or
    `@champion`) or None for the latest. `model@alias` and `model/3` work too.
    A local SQLite store is read directly (no MLflow import); other stores through MLflow.
    """
    uri = uri or default_uri()
    model, version = _split(model, version)
    fast = _SqliteRegistry.open(uri)
    if fast is not None:
        with fast:
            return _walk(fast, model, version, uri)
    from .client import http_limits

    with http_limits():  # a server that stops answering fails in seconds, not minutes
        try:
            return _walk(_MlflowRegistry(_client(uri)), model, version, uri)
        except TrackingError:
            raise
        except Exception as exc:  # MLflow's own errors (server errors, a broken store)
            if type(exc).__module__.split(".")[0] not in ("mlflow", "sqlalchemy", "requests"):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrackingError(f"MLflow at {scrub(uri)} failed: {scrub(first)}") from exc


def _walk(registry: _Registry, model: str, version: str | None, uri: str) -> Lineage:
    """The lineage of `model` at `version`, read from `registry`."""
    root = _resolve(registry, model, version, uri)
    result = Lineage(root=root.key, uri=uri)
    order: list[VersionNode] = []
    pending = [(model, root.version)]
    fetched = {root.key: root}
    seen: set[str] = set()
    while pending:
        name, number = pending.pop()
        key = f"{name}/{number}"
        if key in seen:
            continue
        seen.add(key)
        node = fetched.get(key) or registry.version(name, number)
        if node is None:  # an upstream version deleted since: keep it as a bare node
            order.append(VersionNode(name, number))
            continue
        order.append(node)
        pending.extend(node.upstream)
    by_key = {node.key: node for node in order}
    for key in _upstream_first(by_key):
        result.nodes[key] = by_key[key]
    return result


def _split(model: str, version: str | int | None) -> tuple[str, str | None]:
    if version is None and "@" in model:
        model, _, alias = model.partition("@")
        return model, f"@{alias}"
    if version is None and "/" in model:
        model, _, number = model.rpartition("/")
        return model, number
    if version is None:
        return model, None
    text = str(version)
    return model, text if text.isdigit() or text.startswith("@") else f"@{text}"


#: What to do when `pipekit lineage` finds no store.
NO_STORE = (
    "run a pipeline with `tracking=local` first, or pass uri=... / --uri / MLFLOW_TRACKING_URI"
)


def _client(uri: str) -> Any:
    from .client import existing_client

    return existing_client(uri, TrackingError, NO_STORE)


def _resolve(registry: _Registry, model: str, version: str | None, uri: str) -> VersionNode:
    if not registry.exists(model):
        names = registry.models()
        raise TrackingError(
            f"registered model '{model}' not found in {uri}{did_you_mean(model, names)}; "
            f"models are named <pipeline>.<stage>"
            + (f" (have: {', '.join(sorted(names)[:10])})" if names else "")
        )
    if version is None:
        version = registry.latest(model)
        if version is None:
            raise TrackingError(f"registered model '{model}' has no versions in {uri}")
    if version.startswith("@"):
        aliases = registry.aliases(model)
        number = aliases.get(version[1:])
        found = registry.version(model, number) if number is not None else None
        if found is None:
            have = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
            raise TrackingError(
                f"registered model '{model}' has no alias '{version}'"
                f"{did_you_mean(version[1:], aliases)} (aliases: {have})"
            )
        return found
    found = registry.version(model, version)
    if found is None:
        latest = registry.latest(model)
        newest = f"latest is {latest}" if latest else "it has no versions"
        raise TrackingError(f"registered model '{model}' has no version {version} ({newest})")
    return found


def _node(
    model: str,
    version: str,
    run_id: str | None,
    tags: dict[str, str],
    aliases: Iterable[str],
    created: int | None,
) -> VersionNode:
    return VersionNode(
        model=model,
        version=version,
        run_id=run_id or None,
        parent_run_id=tags.get(tag.PARENT_RUN_ID) or None,
        stage=tags.get(tag.STAGE),
        config_hash=tags.get(tag.CONFIG_HASH),
        aliases=tuple(sorted(aliases)),
        created=created,
        upstream=tuple(tag.upstream_versions(tags)),
    )


# --- where versions are read from ------------------------------------------------------


class _Registry:
    """The few registry reads lineage needs."""

    def exists(self, model: str) -> bool:
        raise NotImplementedError

    def models(self) -> list[str]:
        raise NotImplementedError

    def latest(self, model: str) -> str | None:
        raise NotImplementedError

    def aliases(self, model: str) -> dict[str, str]:
        """alias -> version number"""
        raise NotImplementedError

    def version(self, model: str, number: str) -> VersionNode | None:
        raise NotImplementedError


class _MlflowRegistry(_Registry):
    """Any MLflow store, through `MlflowClient` (servers, Databricks, other databases)."""

    def __init__(self, client: Any):
        self.client = client

    def exists(self, model: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise  # a server error, not a missing model
            return False
        return True

    def models(self) -> list[str]:
        return [m.name for m in self.client.search_registered_models(max_results=1000)]

    def latest(self, model: str) -> str | None:
        found = self.client.search_model_versions(
            f"name = '{model}'", max_results=1, order_by=["version_number DESC"]
        )
        return str(found[0].version) if found else None

    def aliases(self, model: str) -> dict[str, str]:
        registered = self.client.get_registered_model(model)
        return {a: str(v) for a, v in (getattr(registered, "aliases", {}) or {}).items()}

    def version(self, model: str, number: str) -> VersionNode | None:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version(model, number)
        except MlflowException:
            return None
        return _node(
            found.name,
            str(found.version),
            found.run_id,
            dict(found.tags or {}),
            getattr(found, "aliases", ()) or (),
            getattr(found, "creation_timestamp", None),
        )


class _SqliteRegistry(_Registry):
    """A local MLflow SQLite store read with the standard library, read-only.

    `pipekit lineage` reads a handful of rows; importing MLflow to do so costs seconds.
    The tables read (`registered_models`, `model_versions`, `model_version_tags`,
    `registered_model_aliases`) are MLflow's; versions MLflow soft-deleted are skipped as
    MLflow skips them. `open()` returns None (MLflow is used) when the store is not such a
    file, lacks these tables or columns, or MLflow workspaces are on.
    """

    DELETED = "Deleted_Internal"  # MLflow's stage of a soft-deleted version
    WORKSPACE = "default"

    def __init__(self, connection: Any):
        self.db = connection

    @classmethod
    def open(cls, uri: str) -> _SqliteRegistry | None:
        import os
        import sqlite3
        from urllib.parse import quote

        path = sqlite_file(uri)
        if path is None:
            return None
        require_store(uri, TrackingError, NO_STORE)
        if os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true", "yes"):
            return None
        try:
            connection = sqlite3.connect(
                f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=30
            )
            connection.execute(
                "SELECT m.name, v.version, v.run_id, v.creation_time, v.current_stage, "
                "t.key, t.value, a.alias FROM registered_models m, model_versions v, "
                "model_version_tags t, registered_model_aliases a "
                "WHERE m.workspace = v.workspace AND t.workspace = a.workspace LIMIT 0"
            )
        except sqlite3.Error:  # not MLflow's schema (or unreadable): let MLflow say why
            return None
        return cls(connection)

    def __enter__(self) -> _SqliteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def _rows(self, sql: str, *args: Any) -> list[tuple]:
        return self.db.execute(sql, (self.WORKSPACE, *args)).fetchall()

    def exists(self, model: str) -> bool:
        sql = "SELECT 1 FROM registered_models WHERE workspace = ? AND name = ?"
        return bool(self._rows(sql, model))

    def models(self) -> list[str]:
        rows = self._rows("SELECT name FROM registered_models WHERE workspace = ? LIMIT 1000")
        return [name for (name,) in rows]

    def latest(self, model: str) -> str | None:
        sql = (
            "SELECT max(version) FROM model_versions "
            "WHERE workspace = ? AND name = ? AND current_stage IS NOT ?"
        )
        (found,) = self._rows(sql, model, self.DELETED)[0]
        return str(found) if found is not None else None

    def aliases(self, model: str) -> dict[str, str]:
        sql = "SELECT alias, version FROM registered_model_aliases WHERE workspace = ? AND name = ?"
        return {alias: str(number) for alias, number in self._rows(sql, model)}

    def version(self, model: str, number: str) -> VersionNode | None:
        if not str(number).isdigit():
            return None
        sql = (
            "SELECT run_id, creation_time FROM model_versions "
            "WHERE workspace = ? AND name = ? AND version = ? AND current_stage IS NOT ?"
        )
        found = self._rows(sql, model, int(number), self.DELETED)
        if not found:
            return None
        run_id, created = found[0]
        tags = dict(
            self._rows(
                "SELECT key, value FROM model_version_tags "
                "WHERE workspace = ? AND name = ? AND version = ?",
                model,
                int(number),
            )
        )
        aliases = [a for a, v in self.aliases(model).items() if v == str(int(number))]
        return _node(model, str(int(number)), run_id, tags, aliases, created)


def _upstream_first(nodes: dict[str, VersionNode]) -> list[str]:
    order: list[str] = []
    done: set[str] = set()

    def visit(key: str) -> None:
        if key in done or key not in nodes:
            return
        done.add(key)
        for m, v in nodes[key].upstream:
            visit(f"{m}/{v}")
        order.append(key)

    for key in nodes:
        visit(key)
    return order

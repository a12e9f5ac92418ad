"""Lineage of registered model versions: the upstream versions and runs that produced one.

Tracking tags every version of `<pipeline>.<stage>` with `pipekit.upstream.<stage>` =
`<model>/<version>` for each upstream model stage; `lineage()` walks those tags back
through the MLflow registry and returns the chain as data, drawable with graphviz.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..display.render import graphviz_module, pipe
from ..errors import GraphvizNotFoundError, TrackingError, did_you_mean
from . import tags as tag
from .settings import default_uri, sqlite_file


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
    """
    uri = uri or default_uri()
    model, version = _split(model, version)
    client = _client(uri)
    root = _resolve(client, model, version, uri)
    result = Lineage(root=f"{model}/{root.version}", uri=uri)
    order: list[VersionNode] = []
    pending = [(model, str(root.version))]
    fetched = {f"{model}/{root.version}": root}
    seen: set[str] = set()
    while pending:
        name, number = pending.pop()
        key = f"{name}/{number}"
        if key in seen:
            continue
        seen.add(key)
        found = fetched.get(key) or _get_version(client, name, number)
        if found is None:  # an upstream version deleted since: keep it as a bare node
            order.append(VersionNode(name, number))
            continue
        node = _node(found)
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


def _client(uri: str) -> Any:
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise TrackingError(
            f"no MLflow store at {uri} ({path.resolve()} does not exist); run a pipeline "
            f"with `tracking=local` first, or pass uri=... / --uri / MLFLOW_TRACKING_URI"
        )
    from .client import client_for

    return client_for(uri)


def _resolve(client: Any, model: str, version: str | None, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=1000)]
        raise TrackingError(
            f"registered model '{model}' not found in {uri}{did_you_mean(model, names)}; "
            f"models are named <pipeline>.<stage>"
            + (f" (have: {', '.join(sorted(names)[:10])})" if names else "")
        ) from None
    if version is None:
        latest = client.search_model_versions(
            f"name = '{model}'", max_results=1, order_by=["version_number DESC"]
        )
        if not latest:
            raise TrackingError(f"registered model '{model}' has no versions in {uri}")
        version = str(latest[0].version)  # fetched again below: search omits aliases
    if version.startswith("@"):
        try:
            return client.get_model_version_by_alias(model, version[1:])
        except MlflowException:
            aliases = sorted(getattr(registered, "aliases", {}) or {})
            have = ", ".join(f"@{a}" for a in aliases) or "none"
            raise TrackingError(
                f"registered model '{model}' has no alias '{version}'"
                f"{did_you_mean(version[1:], aliases)} (aliases: {have})"
            ) from None
    found = _get_version(client, model, version)
    if found is None:
        latest = client.search_model_versions(
            f"name = '{model}'", max_results=1, order_by=["version_number DESC"]
        )
        newest = f"latest is {latest[0].version}" if latest else "it has no versions"
        raise TrackingError(f"registered model '{model}' has no version {version} ({newest})")
    return found


def _get_version(client: Any, model: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model, version)
    except MlflowException:
        return None


def _node(found: Any) -> VersionNode:
    tags = dict(found.tags or {})
    upstream = tag.upstream_versions(tags)
    return VersionNode(
        model=found.name,
        version=str(found.version),
        run_id=found.run_id or None,
        parent_run_id=tags.get(tag.PARENT_RUN_ID) or None,
        stage=tags.get(tag.STAGE),
        config_hash=tags.get(tag.CONFIG_HASH),
        aliases=tuple(sorted(getattr(found, "aliases", ()) or ())),
        created=getattr(found, "creation_timestamp", None),
        upstream=tuple(upstream),
    )


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

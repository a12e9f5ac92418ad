"""Moving aliases to the best version, and registry retention.

`promote: champion` moves the alias unconditionally (each passing run's versions take it).
`promote: {alias: champion, metric: evaluate.accuracy, mode: max}` moves it only when the
new version's metric (logged by this run) beats the holder's (ties keep the holder). Each
competing version gets its value as tag `pipekit.metric.<stage>.<key>`, so the holder's
value is read from its tags (else from its pipeline run's metrics). Every job of a sweep
compares against the holder at its promotion time, so sequential promotion converges to
the best job in any order; concurrent jobs are serialised per store: a thread lock per
registered model and, for a local SQLite store, a file lock beside the database (other
processes). A server store has no lock: after setting, the alias is settled on the best
version that competed for it (tag `pipekit.candidate.<alias>`), so racing jobs converge.

`tracking.keep_versions: N` deletes, after each registration, that model's versions older
than the newest N that hold no alias (and whose pipeline run is not still running).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..core.graph import Graph
from ..core.promotion import metric_source
from ..core.spec import PipelineSpec
from ..errors import PromotionError
from . import tags as tag
from .client import forget_version, key, store_lock
from .settings import sqlite_file

log = logging.getLogger(__name__)

#: How many versions one retention pass looks at (bounded; the oldest come last).
MAX_VERSIONS = 10_000


def promote(
    client: Any,
    uri: str,
    spec: PipelineSpec,
    graph: Graph,
    stage: str,
    versions: Mapping[str, tuple[str, str]],
    metrics: Mapping[str, float],
    run_id: str | None = None,
) -> list[str]:
    """Apply `stage`'s `promote` to `versions` (model stage -> (model, version) at or upstream
    of it); the `model/version`s the alias moved to. Why each moved or stayed goes to the
    promoting stage run's tag `pipekit.promotion`."""
    settings = spec.stages[stage]
    alias = settings.promote
    if not alias:
        return []
    value, source = None, None
    if settings.promote_metric:
        source = metric_source(spec, graph, stage, settings.promote_metric)
        value = metrics.get(f"{source[0]}.{source[1]}")
        if value is None or math.isnan(value):
            raise PromotionError(
                f"stage '{stage}': promote.metric {settings.promote_metric} has no value in "
                f"this run (stage '{source[0]}' logged no numeric '{source[1]}'); @{alias} "
                f"was not moved"
            )
    moved, notes = [], []
    for model, version in versions.values():
        with registry_lock(uri, model) as locked:
            if source is None or value is None:
                client.set_registered_model_alias(model, alias, version)
                moved.append(f"{model}/{version}")
                continue
            name = tag.metric(*source)
            client.set_model_version_tag(model, version, name, repr(float(value)))
            client.set_model_version_tag(model, version, f"{tag.CANDIDATE}{alias}", "true")
            moves, why = _decide(client, model, version, alias, name, source, value, settings)
            notes.append(why)
            if moves:
                client.set_registered_model_alias(model, alias, version)
                if not locked:  # no lock serialises other writers: settle on the best
                    version = settle(client, model, alias, name, settings.promote_mode)
                moved.append(f"{model}/{version}")
    if notes and run_id:
        client.set_tag(run_id, tag.PROMOTION, "; ".join(notes)[:5000])
    return moved


def _decide(
    client: Any,
    model: str,
    version: str,
    alias: str,
    name: str,
    source: tuple[str, str],
    value: float,
    settings: Any,
) -> tuple[bool, str]:
    """Whether `version` (with `value`) takes `alias` from its holder, and why."""
    metric = f"{source[0]}.{source[1]}"
    holder = holder_of(client, model, alias)
    if holder is None:
        return True, f"{model}/{version} @{alias}: first holder ({metric} {value:g})"
    if holder == version:
        return False, f"{model}/{version} already holds @{alias} ({metric} {value:g})"
    held = holder_value(client, model, holder, name, metric)
    if held is None:
        return True, (
            f"{model}/{version} @{alias}: holder {holder} has no {metric}; replaced ({value:g})"
        )
    better = value > held if settings.promote_mode == "max" else value < held
    verb = "beats" if better else "does not beat"
    return better, (
        f"{model}/{version} ({metric} {value:g}) {verb} holder {holder} ({held:g}, "
        f"mode {settings.promote_mode}): @{alias} {'moved' if better else 'kept'}"
    )


def holder_of(client: Any, model: str, alias: str) -> str | None:
    """The version holding `alias` on registered model `model`, or None."""
    aliases = getattr(client.get_registered_model(model), "aliases", None) or {}
    found = aliases.get(alias)
    return str(found) if found is not None else None


def holder_value(client: Any, model: str, version: str, name: str, metric: str) -> float | None:
    """The promotion metric of a version: its tag, else its pipeline run's metric, else None."""
    held = client.get_model_version(model, version)
    text = (held.tags or {}).get(name)
    if text is None:
        parent = (held.tags or {}).get(tag.PARENT_RUN_ID)
        if not parent:
            return None
        try:
            metrics = client.get_run(parent).data.metrics
        except Exception as exc:  # a deleted run: no value to compare with
            log.debug("pipekit tracking: no run %s for %s/%s: %s", parent, model, version, exc)
            return None
        found = metrics.get(key(metric))
        return None if found is None or math.isnan(found) else float(found)
    try:
        found = float(text)
    except ValueError:
        return None
    return None if math.isnan(found) else found


def settle(client: Any, model: str, alias: str, name: str, mode: str) -> str:
    """Point `alias` at the best version that competed for it (ties: the current holder,
    else the oldest); the holder. Racing writers without a lock all end at the same one."""
    found = client.search_model_versions(
        f"name = '{model}' and tags.`{tag.CANDIDATE}{alias}` = 'true'", max_results=MAX_VERSIONS
    )
    scored = []
    for item in found:
        try:
            number = float((item.tags or {}).get(name, "nan"))
        except ValueError:
            continue
        if not math.isnan(number):
            scored.append((number if mode == "max" else -number, str(item.version)))
    holder = holder_of(client, model, alias)
    if not scored:
        return holder or ""
    top = max(score for score, _ in scored)
    tied = [version for score, version in scored if score == top]
    best = holder if holder in tied else min(tied, key=int)
    if best != holder:
        client.set_registered_model_alias(model, alias, best)
    return best


def prune_versions(
    client: Any,
    uri: str,
    model: str,
    keep: int | None,
    on_failure: Callable[[str], None] | None = None,
) -> list[str]:
    """Delete versions of `model` older than the newest `keep` that hold no alias and whose
    pipeline run has ended (`tracking.keep_versions`); the versions deleted."""
    if not keep:
        return []
    deleted: list[str] = []
    try:
        with registry_lock(uri, model):
            found = client.search_model_versions(f"name = '{model}'", max_results=MAX_VERSIONS)
            held = {str(v) for v in (client.get_registered_model(model).aliases or {}).values()}
            ordered = sorted(found, key=lambda v: int(v.version), reverse=True)
            for old in ordered[keep:]:
                number = str(old.version)
                if number in held or getattr(old, "aliases", None) or _running(client, old):
                    continue
                forget_version(client, old)  # and its logged model
                deleted.append(number)
    except Exception as exc:  # retention must never cost the run its model
        message = f"{model}: retention (tracking.keep_versions={keep}) failed: {exc}"
        if on_failure is not None:
            on_failure(message)
        else:
            log.warning("pipekit tracking: %s", message)
    if deleted:
        log.info("pipekit tracking: %s: deleted versions %s", model, ", ".join(deleted))
    return deleted


def _running(client: Any, version: Any) -> bool:
    """Whether the pipeline run that made `version` is still running (a concurrent job may
    be about to promote it)."""
    parent = (version.tags or {}).get(tag.PARENT_RUN_ID)
    if not parent:
        return False
    try:
        return client.get_run(parent).info.status == "RUNNING"
    except Exception:  # its run was deleted: the version is nobody's work in progress
        return False


_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def registry_lock(uri: str, model: str) -> Iterator[bool]:
    """Serialise alias and retention changes to `model`: a thread lock per (store, model)
    and, for a local SQLite store, an exclusive file lock beside the database (`<db>
    .registry.lock`) against other processes. Yields whether other processes are locked
    out too (False for a server store: see `settle`)."""
    with _locks_guard:
        lock = _locks.setdefault((uri, model), threading.Lock())
    with lock:
        db = sqlite_file(uri)
        if db is None:
            yield False
            return
        with store_lock(db.with_name(f"{db.name}.registry")):
            yield True

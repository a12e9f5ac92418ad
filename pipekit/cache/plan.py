"""Cache planning: each stage's key, and whether a run computes it or takes it stored.

A stage's key hashes its code (and its project helpers, see `fingerprint.py`), its
resolved params, its watched files and its upstream stages' keys (a Merkle chain:
upstream data is never re-hashed).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..core.graph import Graph
from ..core.metrics import numeric_items
from ..core.spec import PipelineSpec, flat_params
from ..core.text import age
from ..errors import CacheEntryError, CacheWarning, where
from ..run.compile import Failed, Skipped
from ..run.execute import CachedStage
from .fingerprint import code_digests, combined, digest, plain, value_token, watch_digests
from .store import FORMAT, CacheStore, original_cwd

#: Why a stage runs whose entry was found unusable while running.
REPLACED = "corrupt entry replaced"


@dataclass(slots=True)
class StagePlan:
    """What a run will do with one stage: `run` or `cached`, and why."""

    stage: str
    action: str  # "run" | "cached"
    reason: str
    key: str | None = None
    manifest: dict[str, Any] | None = None

    def __str__(self) -> str:
        return (
            f"{self.stage}: {'cached' if self.action == 'cached' else 'will run'} ({self.reason})"
        )


class Plan(list):
    """`Pipeline.explain()`: one StagePlan per planned stage, in run order."""

    def __init__(self, pipeline: str, items: Iterable[StagePlan], cache: str | None):
        super().__init__(items)
        self.pipeline = pipeline
        self.cache = cache

    @property
    def to_run(self) -> list[str]:
        return [p.stage for p in self if p.action == "run"]

    @property
    def cached(self) -> list[str]:
        return [p.stage for p in self if p.action == "cached"]

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            for plan in self:
                if plan.stage == item:
                    return plan
            raise KeyError(f"{where(self.pipeline, item)} is not in this plan")
        return super().__getitem__(item)

    def __str__(self) -> str:
        where_ = f"cache {self.cache}" if self.cache else "cache off"
        head = (
            f"pipeline '{self.pipeline}': {len(self.to_run)} of {len(self)} stages will run "
            f"({where_})"
        )
        width = max((len(p.stage) for p in self), default=5)
        rows = [f"  {p.stage:<{width}}  {p.action:<6}  {p.reason}" for p in self]
        return "\n".join([head, *rows])

    def __repr__(self) -> str:
        return str(self)

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| `{p.stage}` | {p.action} | {p.reason} |" for p in self)
        return f"**{self.pipeline}**: {len(self.to_run)} of {len(self)} stages will run\n\n| stage | action | why |\n|---|---|---|\n{rows}"


def static_key_parts(spec: PipelineSpec) -> dict[str, str]:
    """The part of each stage's key the spec fixes (target, params, edges): computed once
    per pipeline, so re-runs only hash code, watched files and upstream keys."""
    parts = {}
    for name, stage in spec.stages.items():
        edges = ",".join(f"{arg}={ref}" for arg, ref in stage.inputs.items())
        params = value_token(dict(stage.params)) if stage.params else ""
        parts[name] = "|".join(
            (f"v{FORMAT}", spec.name, name, stage.target, params, edges, ",".join(stage.after))
        )
    return parts


class Planner:
    """Fingerprints the planned stages in order and decides, per stage, run or cached."""

    def __init__(
        self,
        spec: PipelineSpec,
        funcs: Mapping[str, Callable[..., Any]],
        graph: Graph,
        store: CacheStore | None,
        static: Mapping[str, str] | None = None,
    ):
        self.spec, self.funcs, self.graph, self.store = spec, funcs, graph, store
        self.static = static if static is not None else static_key_parts(spec)
        self.keys: dict[str, str] = {}
        self._code: dict[str, dict[str, str]] = {}
        self._watch: dict[str, dict[str, str]] = {}

    def fingerprint(self, stages: Sequence[str]) -> dict[str, str]:
        """Keys of `stages` (topological order, upstream-closed), remembering what went
        into each so `info()` can describe it for manifests and explain."""
        spec_stages = self.spec.stages
        funcs, static = self.funcs, self.static
        code_memo: dict[int, tuple[str, dict[str, str]]] = {}
        root = original_cwd()
        keys, code, watch = self.keys, self._code, self._watch
        deps = self.graph.deps
        for name in stages:
            stage = spec_stages[name]
            func = funcs[name]
            memo = code_memo.get(id(func))
            if memo is None:
                digests = code_digests(func)
                memo = code_memo[id(func)] = (combined(digests), digests)
            code[name] = memo[1]
            watched = ""
            if stage.watch:
                files = watch[name] = watch_digests(stage.watch, root)
                watched = combined(files)
            upstream = ",".join([keys[dep] for dep in deps[name]])
            keys[name] = digest(f"{static[name]}|{memo[0]}|{upstream}|{watched}")
        return keys

    def info(self, name: str) -> dict[str, Any]:
        """What went into `name`'s key, as stored in its manifest and last pointer."""
        stage = self.spec.stages[name]
        return {
            "pipeline": self.spec.name,
            "stage": name,
            "target": stage.target,
            "params": plain(dict(stage.params)),
            "code": self._code[name],
            "upstream": {dep: self.keys[dep] for dep in stage.upstream},
            "watch": self._watch.get(name, {}),
        }

    def decide(
        self,
        stages: Sequence[str],
        *,
        force: bool | Iterable[str] | None = None,
        manifests: bool = False,
        running: bool = True,
    ) -> dict[str, StagePlan]:
        """Run or cached for each stage. A stage runs when its key has no whole entry, it
        is forced or `cache: false`, or an upstream stage runs without a new key (forced,
        not cached, corrupt): its output may differ from the stored one, so descendants
        recompute too. `manifests` reads (and checks) the manifests of hits."""
        keys = self.fingerprint(stages)
        store = self.store
        spec_stages = self.spec.stages
        forced = set(stages) if force is True else set(force or ())
        present = store.keys() if store is not None else set()
        deps = self.graph.deps
        plans: dict[str, StagePlan] = {}
        rerun: dict[str, str] = {}  # stage -> label, for stages that run with an unchanged key
        for name in stages:
            key = keys[name]
            why, label = "", ""
            if store is None:
                why = "cache off"
            elif name in forced:
                why, label = "forced", "forced"
            elif not spec_stages[name].cache:
                why, label = "cache: false", "not cached"
            elif rerun:
                moved = [dep for dep in deps[name] if dep in rerun]
                if moved:
                    label = rerun[moved[0]]
                    why = f"upstream {label}: {', '.join(moved)}"
            if not why and not manifests and key in present:  # the no-op re-run fast path
                plans[name] = StagePlan(name, "cached", "unchanged", key)
                continue
            manifest = None
            if not why and key in present:
                if manifests:
                    manifest = store.manifest(key)  # type: ignore[union-attr]
                    problem = store.check(key, manifest)  # type: ignore[union-attr]
                    if problem is not None and problem != "no entry":
                        why = self.corrupt(name, key, problem, running)  # same key: no label
                if not why:
                    reason = _cached_reason(manifest)
                    plans[name] = StagePlan(name, "cached", reason, key, manifest)
                    continue
            if not why:
                why = self.why(name)
            plans[name] = StagePlan(name, "run", why, key)
            if label:
                rerun[name] = label
        return plans

    def corrupt(self, stage: str, key: str, problem: str, running: bool = True) -> str:
        """Warn about an unusable entry; the reason shown for the stage."""
        if not running:
            return f"{problem}; will be replaced"
        warnings.warn(
            f"{where(self.spec.name, stage)}: cache entry {key[:12]} is unusable "
            f"({problem}); recomputing and replacing it",
            CacheWarning,
            stacklevel=3,
        )
        return REPLACED

    def load(self, plan: StagePlan) -> Any:
        """A cached stage's output. An entry that proves unusable is removed with a
        warning and CacheEntryError raised: the caller recomputes the stage."""
        store, key = self.store, plan.key
        assert store is not None and key is not None
        try:
            return store.load(key, plan.manifest)
        except CacheEntryError as exc:
            store.remove(key)
            self.corrupt(plan.stage, key, str(exc))
            raise

    def why(self, name: str) -> str:
        """Why `name`'s key has no entry: a diff against what it was last computed from."""
        store = self.store
        last = store.last(self.spec.name, name) if store is not None else None
        if last is None:
            return "no entry"
        info = self.info(name)
        if last.get("key") == self.keys[name]:
            return "no entry (removed)"
        changes: list[str] = []
        old_code, new_code = last.get("code") or {}, info["code"]
        if old_code != new_code:
            changed = sorted(
                k for k in set(old_code) | set(new_code) if old_code.get(k) != new_code.get(k)
            )
            shown = ", ".join(n.rsplit(".", 1)[-1] if ":" not in n else n for n in changed[:3])
            changes.append(f"code changed: {shown}" if shown else "code changed")
        params = _param_changes(last.get("params") or {}, info["params"])
        if params:
            changes.append(f"params changed: {params}")
        old_watch, new_watch = last.get("watch") or {}, info["watch"]
        files = sorted(
            k for k in set(old_watch) | set(new_watch) if old_watch.get(k) != new_watch.get(k)
        )
        if files:
            changes.append(f"watched file changed: {', '.join(files[:3])}")
        old_up = last.get("upstream") or {}
        moved = [dep for dep, key in info["upstream"].items() if old_up.get(dep) != key]
        if moved:
            changes.append(f"upstream changed: {', '.join(moved)}")
        if last.get("target") != info["target"]:
            changes.append(f"target changed: {last.get('target')} → {info['target']}")
        return "; ".join(changes) or "no entry"

    def prepare(
        self, stages: Sequence[str], plans: dict[str, StagePlan], wants_outputs: bool
    ) -> tuple[dict[str, CachedStage], list[str]]:
        """Load the cached outputs a run needs; the cached stages and the stages to compute.

        Loads run in the driver, newest stage first: an entry that turns out corrupt is
        recomputed instead (with a warning), which may need its own upstream outputs.
        Outputs nobody needs stay on disk (read on first access after the run) unless an
        observer wants them.
        """
        spec = self.spec.stages
        cached = {s for s in stages if plans[s].action == "cached"}
        if wants_outputs:
            needed = set(cached)
        else:
            needed = {d for s in stages if s not in cached for d in spec[s].upstream} & cached
        loaded: dict[str, Any] = {}
        for name in reversed(stages):
            if name not in needed or name not in cached:
                continue
            plan = plans[name]
            try:
                loaded[name] = self.load(plan)
            except CacheEntryError:
                plans[name] = StagePlan(name, "run", REPLACED, plan.key)
                cached.discard(name)
                needed.update(d for d in spec[name].upstream if d in cached)
        hits = {}
        for name in stages:
            plan = plans[name]
            if plan.action != "cached":
                continue
            load = partial(self.load_later, plan)
            meta = {"cache_key": plan.key, "manifest": plan.manifest or {}, "load": load}
            if name in loaded:
                hits[name] = CachedStage(plan.reason, loaded[name], True, meta=meta)
            else:
                hits[name] = CachedStage(plan.reason, load=load, meta=meta)
        return hits, [s for s in stages if plans[s].action == "run"]

    def store_outputs(self, dsk: dict[str, Any], computed: Sequence[str]) -> dict[str, dict]:
        """Wrap the tasks of `computed` stages so workers write their outputs to the store;
        the facts observers get about each (its cache key)."""
        store = self.store
        assert store is not None
        meta: dict[str, dict] = {}
        for name in computed:
            if self.spec.stages[name].cache:
                task, key = dsk[name], self.keys[name]
                dsk[name] = (StoreTask(task[0], store, key, self.info(name)), *task[1:])
                meta[name] = {"cache_key": key}
        return meta

    def load_later(self, plan: StagePlan) -> Any:
        """A cached output first read after the run; a corrupt entry is removed and named."""
        store, key = self.store, plan.key
        assert store is not None and key is not None
        try:
            return store.load(key, plan.manifest)
        except CacheEntryError as exc:
            store.remove(key)
            raise CacheEntryError(
                f"{where(self.spec.name, plan.stage)}: its cached output is unusable ({exc}); "
                f"the entry was removed: run the pipeline again to recompute it"
            ) from exc


def _cached_reason(manifest: Mapping[str, Any] | None) -> str:
    if not manifest:
        return "unchanged"
    return f"unchanged since {age(time.time() - float(manifest.get('created') or 0))} ago"


def _param_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    before, after = flat_params(old), flat_params(new)
    parts = []
    for key in list(after) + [k for k in before if k not in after]:
        if key not in before:
            parts.append(f"+{key}={after[key]!r}")
        elif key not in after:
            parts.append(f"-{key}")
        elif before[key] != after[key] or type(before[key]) is not type(after[key]):
            parts.append(f"{key} {before[key]!r} → {after[key]!r}")
    return ", ".join(parts)


class StoreTask:
    """Runs a stage task, then writes its output to the store, in the worker (so the
    processes scheduler works too). A failed write warns; the stage still succeeds."""

    __slots__ = ("info", "key", "store", "task")

    def __init__(
        self, task: Callable[..., Any], store: CacheStore, key: str, info: Mapping[str, Any]
    ):
        self.task, self.store, self.key, self.info = task, store, key, info

    def __reduce__(self):
        return (StoreTask, (self.task, self.store, self.key, self.info))

    def __call__(self, *upstream: Any) -> Any:
        output = self.task(*upstream)
        if not isinstance(output, (Failed, Skipped)):
            try:
                info = {**self.info, "metrics": numeric_items(output)}
                self.store.put(self.key, output, info)
            except Exception as exc:
                warnings.warn(
                    f"{where(self.info.get('pipeline'), self.info.get('stage'))}: output not "
                    f"cached ({type(exc).__name__}: {exc})",
                    CacheWarning,
                    stacklevel=2,
                )
        return output

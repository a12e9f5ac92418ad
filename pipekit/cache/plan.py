"""Cache planning: each stage's key, and whether a run computes it or takes it stored.

A stage's key hashes its code (and its project helpers and constants, see
`fingerprint.py`), its resolved params, its watched files and what its upstream stages
show downstream, their *views* (a Merkle chain: upstream data is never re-hashed):

- a plain stage's view is its key;
- a stage with declared `outs` shows its key and the content hashes of those files, as
  its entry recorded them (or as they are once it ran);
- a stage that always runs (`cache: false`, or `cache: {ttl: ...}`) shows its *output*:
  the checksum of its pickled value and its outs hashes. Its descendants are planned
  after it ran, so an unchanged output keeps them cached (early cutoff, as Bazel and
  Buck do). `Phases` plans a run in such phases; `execute(..., then=...)` runs them.

A stage whose code fingerprint cannot be trusted (a constant without a token, a walk
cut off) is not cacheable: it runs every time, and so do the stages after it.

Within one pipeline run id (`PIPEKIT_RUN_ID`: the tasks of one Airflow DAG run are
separate pipekit runs sharing it), an always-run stage runs once, in its own task: its
output is stored with the run id (a `cache: false` stage under `run_key`, a ttl stage
under its key), and a later run of that id that needs it upstream of its targets takes
that stored output (`already ran in this run (<task>)`) instead of running it again.
"""

from __future__ import annotations

import time
import uuid
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
from ..run.compile import Failed, Skipped, Value
from ..run.execute import CachedStage, Phase
from .fingerprint import (
    code_fingerprint,
    combined,
    digest,
    outs_digests,
    plain,
    value_token,
    watch_digests,
)
from .store import FORMAT, CacheStore, original_cwd, value_checksum

#: Why a stage runs whose entry was found unusable while running.
REPLACED = "corrupt entry replaced"
#: Not-cacheable warnings already given in this process: (pipeline, stage, problems).
_WARNED: set[tuple[str, str, tuple[str, ...]]] = set()
#: What explain adds to an always-run stage with descendants.
CUTOFF = "descendants cached if its output is unchanged"
#: Why an always-run upstream stage is taken from the run of the same id that ran it.
SAME_RUN = "already ran in this run"


def now() -> float:
    """The clock `cache: {ttl: ...}` expiry reads (tests replace it)."""
    return time.time()


def output_view(checksum: str, outs: Mapping[str, str] | None) -> str:
    """What descendants of an always-run stage see: its value's checksum and outs hashes."""
    return digest(f"output|{checksum}|{combined(outs or {})}")


def outs_view(key: str, outs: Mapping[str, str] | None) -> str:
    """What descendants of a stage with `outs` see: its key and its files' hashes."""
    return digest(f"{key}|outs|{combined(outs or {})}")


def outs_changes(recorded: Mapping[str, str] | None, current: Mapping[str, str]) -> str:
    """`data/combined.csv missing, data/raw/a.csv changed`: declared outputs that differ."""
    recorded = recorded or {}
    parts = []
    for path in sorted(set(recorded) | set(current)):
        now_, then = current.get(path), recorded.get(path)
        if now_ == then:
            continue
        if now_ in (None, "missing"):
            parts.append(f"{path} missing")
        elif then in (None, "missing"):
            parts.append(f"{path} new")
        else:
            parts.append(f"{path} changed")
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return ", ".join(parts[:3]) + more


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
        *,
        run_id: str | None = None,
        targets: Sequence[str] = (),
    ):
        self.spec, self.funcs, self.graph, self.store = spec, funcs, graph, store
        self.static = static if static is not None else static_key_parts(spec)
        #: the pipeline run id shared by several runs (`PIPEKIT_RUN_ID`), or None
        self.run_id = run_id or None
        #: the run's targets: with a run id, their upstream always-run stages that a run
        #: of the same id already ran are taken from it (the targets themselves always run)
        self.targets = tuple(targets)
        self.keys: dict[str, str] = {}
        #: stage -> why its code fingerprint cannot be trusted (such a stage always runs)
        self.problems: dict[str, tuple[str, ...]] = {}
        self._code: dict[str, dict[str, str]] = {}
        self._watch: dict[str, dict[str, str]] = {}
        self._outs: dict[str, dict[str, str]] = {}  # declared outputs' hashes at planning
        self._memo: dict[int, tuple[str, dict[str, str], tuple[str, ...]]] = {}
        #: stage -> what its descendants' keys contain (see the module docstring)
        self.views: dict[str, str] = {}
        #: stages whose view is known once they ran; stages planned after them
        self.unresolved: set[str] = set()
        self.waiting: list[str] = []
        #: always-run stage -> the view of its last output (to say "output unchanged")
        self.previous: dict[str, str | None] = {}
        self._forced: set[str] = set()
        self._rerun: dict[str, str] = {}
        self._running, self._manifests, self._phased = True, False, False
        self._present: set[str] = set()
        #: explain: stage -> the always-run stages whose predicted output its plan assumes
        self._assumes: dict[str, tuple[str, ...]] = {}

    def fingerprint(self, stages: Sequence[str]) -> dict[str, str]:
        """Keys of `stages` (topological order, upstream-closed), remembering what went
        into each so `info()` can describe it for manifests and explain."""
        root = original_cwd()
        for name in stages:
            self._fingerprint(name, root)
        return self.keys

    def _fingerprint(self, name: str, root: str) -> str:
        stage = self.spec.stages[name]
        func = self.funcs[name]
        memo = self._memo.get(id(func))
        if memo is None:
            found = code_fingerprint(func)
            memo = (combined(found.digests), found.digests, found.problems)
            self._memo[id(func)] = memo
        self._code[name] = memo[1]
        if memo[2]:
            self.problems[name] = memo[2]
        else:
            self.problems.pop(name, None)
        watched = ""
        if stage.watch:
            files = self._watch[name] = watch_digests(stage.watch, root)
            watched = combined(files)
        upstream = ",".join([self.view(dep) for dep in self.graph.deps[name]])
        key = self.keys[name] = digest(f"{self.static[name]}|{memo[0]}|{upstream}|{watched}")
        return key

    def always(self, name: str) -> bool:
        """A stage that re-runs without a change of key (`cache: false`, a ttl)."""
        stage = self.spec.stages[name]
        return not stage.cache or stage.ttl is not None

    def run_key(self, name: str) -> str:
        """Where a `cache: false` stage's output is stored for the other runs of the same
        run id: its key and the run id (such an entry is never a hit across run ids)."""
        return digest(f"{self.keys[name]}|run|{self.run_id}")

    def _same_run(self, name: str, key: str) -> StagePlan | None:
        """With a run id: `name` (an always-run stage upstream of the targets) as a run of
        this id stored it, when its entry is whole, carries this run id and its declared
        outs are as it left them; else None (the stage runs as without a run id)."""
        store, stage = self.store, self.spec.stages[name]
        if (
            store is None
            or self.run_id is None
            or not self.targets
            or name in self.targets
            or name in self.problems
            or not self.always(name)
        ):
            return None
        entry = key if stage.cache else self.run_key(name)
        if entry not in self._present:
            return None
        manifest = store.manifest(entry)
        if manifest is None or manifest.get("run_id") != self.run_id:
            return None
        if store.check(entry, manifest) is not None:
            return None
        if stage.outs and outs_changes(manifest.get("outs"), self._outs[name]):
            return None  # its files changed since: run it (never a view the files belie)
        ran_by = manifest.get("ran_by") or "an earlier task"
        return StagePlan(name, "cached", f"{SAME_RUN} ({ran_by})", entry, manifest)

    def run_info(self, name: str) -> dict[str, Any]:
        """What an always-run stage's entry adds with a run id: the id and who ran it."""
        if self.run_id is None or not self.always(name):
            return {}
        return {"run_id": self.run_id, "ran_by": ",".join(self.targets) or "whole pipeline"}

    def view(self, name: str) -> str:
        """What `name` shows its descendants' keys; a stand-in (no entry has it) while
        its output is not known."""
        found = self.views.get(name)
        if found is not None:
            return found
        key = self.keys[name]
        stage = self.spec.stages[name]
        return key if not (stage.outs or self.always(name)) else digest(f"{key}|unresolved")

    def info(self, name: str) -> dict[str, Any]:
        """What went into `name`'s key, as stored in its manifest and last pointer."""
        stage = self.spec.stages[name]
        return {
            "pipeline": self.spec.name,
            "stage": name,
            "target": stage.target,
            "params": plain(dict(stage.params)),
            "code": self._code[name],
            "upstream": {dep: self.view(dep) for dep in stage.upstream},
            "watch": self._watch.get(name, {}),
        }

    def decide(
        self,
        stages: Sequence[str],
        *,
        force: bool | Iterable[str] | None = None,
        manifests: bool = False,
        running: bool = True,
        phased: bool = False,
    ) -> dict[str, StagePlan]:
        """Run or cached for each stage. A stage runs when its key has no whole entry
        (or its declared outs differ from the entry's, or its ttl expired), it is forced
        or `cache: false`, or an upstream stage runs without a new key (forced, not
        cacheable, corrupt): its output may differ, so descendants recompute too.
        `manifests` reads (and checks) the manifests of hits.

        `phased` (a run): stages after an always-run stage, or after a stage that
        rewrites its outs, are not decided yet; they are in `waiting`, for `decide_more`
        once those ran. Otherwise their keys use the last output (`explain`: a
        prediction) or, in a run, a stand-in: they run (the behaviour before early cutoff).
        """
        self._forced = set(stages) if force is True else set(force or ())
        self._rerun, self.waiting, self.unresolved = {}, [], set()
        self._running, self._manifests, self._phased = running, manifests, phased
        self._present = self.store.keys() if self.store is not None else set()
        return self.decide_more(stages)

    def decide_more(self, stages: Sequence[str]) -> dict[str, StagePlan]:
        """Decide `stages` (topological order) with the views known so far."""
        store, spec_stages, deps = self.store, self.spec.stages, self.graph.deps
        forced, rerun, running, present = self._forced, self._rerun, self._running, self._present
        root = original_cwd()
        plans: dict[str, StagePlan] = {}
        pending = self.unresolved | set(self.waiting)
        self.waiting = []
        for name in stages:
            if self._phased and any(dep in pending for dep in deps[name]):
                pending.add(name)
                self.waiting.append(name)
                continue
            key = self._fingerprint(name, root)
            stage = spec_stages[name]
            if stage.outs:
                self._outs[name] = outs_digests(stage.outs, root)
            why, label = "", ""
            if store is None:
                why = "cache off"
            elif name in forced:
                why, label = "forced", "forced"
            elif not stage.cache:
                why = "cache: false"
            elif name in self.problems:
                why, label = self.not_cacheable(name, running), "not cached"
            elif rerun:
                moved = [dep for dep in deps[name] if dep in rerun]
                if moved:
                    label = rerun[moved[0]]
                    why = f"upstream {label}: {', '.join(moved)}"
            if self.run_id is not None and not label and why in ("", "cache: false"):
                same = self._same_run(name, key)
                if same is not None:  # an earlier run of this run id ran it: take its output
                    plans[name] = same
                    self.views[name] = self._cached_view(name, key, same.manifest)  # type: ignore[arg-type]
                    continue
            checks = stage.outs or stage.ttl is not None
            if not why and not self._manifests and not checks and key in present:
                plans[name] = StagePlan(name, "cached", "unchanged", key)  # the no-op fast path
                self.views[name] = key
                continue
            manifest = None
            if not why and key in present:
                manifest = store.manifest(key)  # type: ignore[union-attr]
                problem = store.check(key, manifest)  # type: ignore[union-attr]
                if problem is not None and problem != "no entry":
                    why = self.corrupt(name, key, problem, running)  # same key: no label
                elif problem is None:
                    why = self._stale(name, manifest)  # type: ignore[arg-type]
                    if not why:
                        reason = _cached_reason(manifest)
                        assumed = self._assumed(name)
                        if assumed and not running:
                            reason += f" (if the output of {', '.join(assumed)} is unchanged)"
                        plans[name] = StagePlan(name, "cached", reason, key, manifest)
                        self.views[name] = self._cached_view(name, key, manifest)  # type: ignore[arg-type]
                        continue
            if not why:
                why = self.why(name)
            if label:
                rerun[name] = label
            if store is not None and self.always(name) and not label:
                self.previous[name] = self._last_output(name)
                if self._descendants(name) and not running:
                    why = (
                        f"{why} (always runs; {CUTOFF})" if not stage.cache else f"{why}; {CUTOFF}"
                    )
            plans[name] = StagePlan(name, "run", why, key)
            if stage.outs or self.always(name):
                if self._phased and not label:
                    self.unresolved.add(name)
                    pending.add(name)
                elif not running and not label:
                    self.views[name] = self._predicted_view(name, key, manifest)
                    if self.always(name):
                        self._assumes[name] = (name,)
                elif running and self.always(name) and not label:
                    rerun[name] = "not cached"  # a run without phases (sweeps): as before
            else:
                self.views[name] = key
        return plans

    def _assumed(self, name: str) -> tuple[str, ...]:
        """Explain: the always-run upstream stages whose unchanged output `name`'s cached
        plan assumes (through cached stages)."""
        found = dict.fromkeys(
            a for dep in self.graph.deps[name] for a in self._assumes.get(dep, ())
        )
        if found:
            self._assumes[name] = tuple(found)
        return tuple(found)

    def _stale(self, name: str, manifest: Mapping[str, Any]) -> str:
        """Why a whole entry cannot be used: its ttl expired or its outs changed ('' if fine)."""
        stage = self.spec.stages[name]
        if stage.ttl is not None:
            since = now() - float(manifest.get("created") or 0)
            if since >= stage.ttl:
                return f"expired: computed {age(since)} ago (ttl {age(stage.ttl)})"
        if stage.outs:
            changed = outs_changes(manifest.get("outs"), self._outs[name])
            if changed:
                return f"outs changed: {changed}"
        return ""

    def _cached_view(self, name: str, key: str, manifest: Mapping[str, Any]) -> str:
        if self.always(name):
            return output_view(str(manifest.get("checksum")), manifest.get("outs"))
        if self.spec.stages[name].outs:
            return outs_view(key, manifest.get("outs"))
        return key

    def _predicted_view(self, name: str, key: str, manifest: Mapping[str, Any] | None) -> str:
        """`explain`: the view if the stage reproduces its last output (always-run) or the
        outs its entry recorded; a stand-in when nothing was recorded."""
        if self.always(name):
            found = self.previous.get(name)
        elif manifest is not None and manifest.get("outs") is not None:
            found = outs_view(key, manifest["outs"])
        else:
            found = None
        return found or digest(f"{key}|unresolved")

    def _last_output(self, name: str) -> str | None:
        last = self.store.last(self.spec.name, name) if self.store is not None else None
        if not last or not isinstance(last.get("checksum"), str):
            return None
        return output_view(last["checksum"], last.get("outs"))

    def _descendants(self, name: str) -> list[str]:
        return [s for s, deps in self.graph.deps.items() if name in deps]

    def resolve(self, outputs: Mapping[str, Any]) -> dict[str, str]:
        """Views of the unresolved stages that ran (their output digests); returns the
        early-cutoff verdict of each always-run one ("output unchanged"/"output changed").
        A `cache: false` stage's digest goes to its last pointer (explain's prediction)."""
        root, verdicts = original_cwd(), {}
        for name in sorted(self.unresolved & set(outputs)):
            self.unresolved.discard(name)
            value, stage = outputs[name], self.spec.stages[name]
            if isinstance(value, (Failed, Skipped)):
                self.views[name] = digest(f"failed|{uuid.uuid4().hex}")
                continue
            outs = outs_digests(stage.outs, root) if stage.outs else {}
            if not self.always(name):
                self.views[name] = outs_view(self.keys[name], outs)
                continue
            stored = self._stored_output(name)
            if stored is not None:  # the digest later runs of this run id will see
                checksum, outs = stored
            else:
                try:
                    checksum = value_checksum(value)
                except Exception as exc:  # no digest: descendants run (never a wrong hit)
                    self.views[name] = digest(f"unhashable|{uuid.uuid4().hex}")
                    verdicts[name] = f"output not hashable ({type(exc).__name__})"
                    continue
            view = self.views[name] = output_view(checksum, outs)
            if not stage.cache and self.store is not None:
                try:
                    info = {**self.info(name), "key": self.keys[name], "checksum": checksum}
                    info.update(self.run_info(name))
                    if stored is not None:
                        info["entry"] = self.run_key(name)
                    self.store.remember(self.spec.name, name, {**info, "outs": outs})
                except Exception as exc:
                    warnings.warn(
                        f"{where(self.spec.name, name)}: its output digest was not recorded "
                        f"({type(exc).__name__}: {exc}); explain cannot predict its descendants",
                        CacheWarning,
                        stacklevel=2,
                    )
            same = self.previous.get(name) == view
            verdicts[name] = "output unchanged" if same else "output changed"
        return verdicts

    def _stored_output(self, name: str) -> tuple[str, dict[str, str]] | None:
        """(checksum, outs) of the entry a `cache: false` stage just stored for the other
        runs of this run id (so they and this run see one digest), or None."""
        if self.run_id is None or self.store is None or self.spec.stages[name].cache:
            return None
        manifest = self.store.manifest(self.run_key(name))
        if manifest is None or manifest.get("run_id") != self.run_id:
            return None
        checksum, outs = manifest.get("checksum"), manifest.get("outs")
        if not isinstance(checksum, str):
            return None
        return checksum, dict(outs) if isinstance(outs, Mapping) else {}

    def not_cacheable(self, stage: str, running: bool) -> str:
        """The reason shown for a stage whose fingerprint cannot be trusted; warns once
        per process when a run meets it."""
        problems = self.problems[stage]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        reason = f"not cacheable: {problems[0]}{more}"
        seen = (self.spec.name, stage, problems)
        if running and seen not in _WARNED:
            _WARNED.add(seen)
            if problems[0].startswith("code walk stopped"):
                fix = "raise pipekit.cache.fingerprint.MAX_OBJECTS"
            else:
                fix = "make it a plain value or create it inside the function"
            warnings.warn(
                f"{where(self.spec.name, stage)} is {reason}; it runs every time, and so do "
                f"the stages after it ({fix}, or set stages.{stage}.cache=false to say so)",
                CacheWarning,
                stacklevel=3,
            )
        return reason

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
        self,
        stages: Sequence[str],
        plans: dict[str, StagePlan],
        wants_outputs: bool,
        keep: Iterable[str] = (),
    ) -> tuple[dict[str, CachedStage], list[str]]:
        """Load the cached outputs a run needs; the cached stages and the stages to compute.

        Loads run in the driver, newest stage first: an entry that turns out corrupt is
        recomputed instead (with a warning), which may need its own upstream outputs.
        Outputs nobody needs stay on disk (read on first access after the run) unless an
        observer wants them or they are in `keep` (inputs of stages a later phase decides).
        """
        spec = self.spec.stages
        cached = {s for s in stages if plans[s].action == "cached"}
        if wants_outputs:
            needed = set(cached)
        else:
            needed = {d for s in stages if s not in cached for d in spec[s].upstream} & cached
            needed |= set(keep) & cached
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
                metrics = partial(self.stored_metrics, plan)
                hits[name] = CachedStage(plan.reason, load=load, meta=meta, metrics=metrics)
        return hits, [s for s in stages if plans[s].action == "run"]

    def store_outputs(self, dsk: dict[str, Any], computed: Sequence[str]) -> dict[str, dict]:
        """Wrap the tasks of `computed` stages so workers write their outputs to the store;
        the facts observers get about each (its cache key). A `cache: false` stage stores
        only with a run id, under `run_key` (for the later runs of that id)."""
        store = self.store
        assert store is not None
        meta: dict[str, dict] = {}
        for name in computed:
            if name in self.problems:
                continue
            stage, key = self.spec.stages[name], self.keys[name]
            if not stage.cache:
                if self.run_id is None:
                    continue  # stores nothing: its digest goes to `last/` (resolve)
                key = self.run_key(name)  # for the other runs of this run id only
            task, info = dsk[name], {**self.info(name), **self.run_info(name)}
            store_task = StoreTask(task[0], store, key, info, stage.outs, original_cwd())
            dsk[name] = (store_task, *task[1:])
            meta[name] = {"cache_key": key}
        return meta

    def stored_metrics(self, plan: StagePlan) -> Mapping[str, Any]:
        """The metrics recorded in a cached stage's manifest (read now if not yet read)."""
        manifest = plan.manifest
        if manifest is None and self.store is not None and plan.key is not None:
            manifest = self.store.manifest(plan.key)
        found = (manifest or {}).get("metrics")
        return found if isinstance(found, Mapping) else {}

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
    from ..core.redact import MASK, is_secret_key

    before, after = flat_params(old), flat_params(new)
    parts = []
    for key in list(after) + [k for k in before if k not in after]:
        secret = is_secret_key(key)  # `explain` never prints a password
        if key not in before:
            parts.append(f"+{key}={MASK if secret else repr(after[key])}")
        elif key not in after:
            parts.append(f"-{key}")
        elif before[key] != after[key] or type(before[key]) is not type(after[key]):
            change = f"{MASK} → {MASK}" if secret else f"{before[key]!r} → {after[key]!r}"
            parts.append(f"{key} {change}")
    return ", ".join(parts)


class StoreTask:
    """Runs a stage task, then writes its output to the store, in the worker (so the
    processes scheduler works too). A failed write warns; the stage still succeeds.

    The manifest records the content hashes of the stage's declared `outs` as the stage
    left them, and the value's checksum (the content digest of its pickle, computed while
    writing it): together, the stage's output for early cutoff. A stage that failed
    writes nothing, so files it half wrote never match an entry.
    """

    __slots__ = ("info", "key", "outs", "root", "store", "task")

    def __init__(
        self,
        task: Callable[..., Any],
        store: CacheStore,
        key: str,
        info: Mapping[str, Any],
        outs: Sequence[str] = (),
        root: str | None = None,
    ):
        self.task, self.store, self.key, self.info = task, store, key, info
        self.outs, self.root = tuple(outs), root

    def __reduce__(self):
        return (StoreTask, (self.task, self.store, self.key, self.info, self.outs, self.root))

    def __call__(self, *upstream: Any) -> Any:
        output = self.task(*upstream)
        if not isinstance(output, (Failed, Skipped)):
            try:
                info = {**self.info, "metrics": numeric_items(output)}
                if self.outs:
                    info["outs"] = outs_digests(self.outs, self.root)
                self.store.put(self.key, output, info)
            except Exception as exc:
                warnings.warn(
                    f"{where(self.info.get('pipeline'), self.info.get('stage'))}: output not "
                    f"cached ({type(exc).__name__}: {exc})",
                    CacheWarning,
                    stacklevel=2,
                )
        return output


class Phases:
    """A run planned in phases: the stages decidable now, then (once the always-run stages
    and the stages rewriting their outs ran) the stages after them, with keys from their
    outputs. `first()` is the first phase; `execute(..., then=phases.next)` asks for more.
    """

    def __init__(
        self,
        planner: Planner,
        stages: Sequence[str],
        tasks: Callable[[list[str]], dict[str, Any]],
        *,
        force: bool | Iterable[str] | None = None,
        manifests: bool = False,
        wants_outputs: bool = False,
    ):
        self.planner, self.stages, self.tasks = planner, list(stages), tasks
        self.force, self.manifests, self.wants_outputs = force, manifests, wants_outputs
        self.plans: dict[str, StagePlan] = {}
        self.values: dict[str, Any] = {}  # outputs in the driver: computed or loaded
        self.hits: dict[str, CachedStage] = {}

    def first(self) -> Phase:
        plans = self.planner.decide(
            self.stages, force=self.force, manifests=self.manifests, phased=True
        )
        return self._phase(plans)

    def next(self, outputs: Mapping[str, Any]) -> Phase | None:
        """The next phase once `outputs` are known; None when every stage is decided."""
        planner = self.planner
        self.values.update(outputs)
        if not planner.waiting:
            return None
        verdicts = planner.resolve(outputs)
        phase = self._phase(planner.decide_more(list(planner.waiting)))
        reasons = dict(phase.reasons)
        for name, verdict in verdicts.items():
            kept = [s for s in planner._descendants(name) if s in phase.cached]
            shown = f" → {', '.join(kept)} cached" if kept and verdict == "output unchanged" else ""
            reasons[name] = f"{self.plans[name].reason}; {verdict}{shown}"
        return phase._replace(reasons=reasons)

    def _phase(self, plans: dict[str, StagePlan]) -> Phase:
        planner = self.planner
        self.plans.update(plans)
        decided = [s for s in self.stages if s in plans]
        deps = planner.graph.deps
        keep = {d for w in planner.waiting for d in deps[w]}
        cached, computed = planner.prepare(decided, plans, self.wants_outputs, keep)
        self.plans.update(plans)  # prepare turns corrupt hits into runs
        dsk = self.tasks(computed)
        meta = planner.store_outputs(dsk, computed) if planner.store is not None else {}
        for name, hit in cached.items():
            self.hits[name] = hit
            if hit.loaded:
                dsk[name] = (Value(hit.output),)
                self.values[name] = hit.output
        for name in computed:  # inputs decided in an earlier phase
            for dep in planner.spec.stages[name].upstream:
                if dep not in dsk:
                    if dep not in self.values:
                        self.values[dep] = self.hits[dep].load()  # type: ignore[misc]
                    dsk[dep] = (Value(self.values[dep]),)
        reasons = {s: plans[s].reason for s in computed}
        return Phase(dsk, computed, cached, reasons, meta)

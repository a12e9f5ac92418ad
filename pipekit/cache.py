"""The content-addressed stage cache: keys, an atomic store, and why each stage runs.

A stage's key hashes its code (and its project helpers, see `fingerprint.py`), its
resolved params, its watched files and its upstream stages' keys (a Merkle chain:
upstream data is never re-hashed). An entry is `values/<key>.pkl` (cloudpickle)
plus `entries/<key>.json` (the manifest), each written to a temp file and renamed into
place, manifest last: an entry exists only once both are complete, so a killed run
leaves no half entry. `last/<pipeline>/<stage>.json` remembers what the stage was last
computed from, so `explain` can say "params changed: C 1.0 → 0.5".
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

from .errors import CacheConfigError, CacheEntryError, CacheWarning, did_you_mean, where
from .fingerprint import code_digests, combined, digest, plain, value_token, watch_digests
from .spec import backend_name, flat_params

if TYPE_CHECKING:
    from .pipeline import Pipeline

#: Bump when the key recipe or the entry format changes: old entries become misses.
FORMAT = 1

BACKEND_KEYS: dict[str, set[str]] = {
    "off": {"backend"},
    "local": {"backend", "path"},
    "fsspec": {"backend", "url", "options"},
}

_TMP = ".tmp-"
#: Why a stage runs whose entry was found unusable while running.
REPLACED = "corrupt entry replaced"


# --- storage primitives -------------------------------------------------------------------


class _LocalFS:
    """The few file operations the store needs, on the local disk (os calls, no fsspec)."""

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def read(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    @contextmanager
    def write_atomic(self, path: str) -> Iterator[IO[bytes]]:
        """Write to a unique temp file beside `path`, then rename it over `path`."""
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{_TMP}{uuid.uuid4().hex[:12]}-{name}")
        try:
            with open(tmp, "wb") as handle:
                yield handle
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def remove(self, path: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(path)

    def stat(self, path: str) -> tuple[int, float] | None:
        """(size, mtime) or None."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime

    def rmtree(self, path: str) -> None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


class _FsspecFS(_LocalFS):
    """The same operations on any fsspec filesystem (`s3://`, `gs://`, `file://`, `memory://`)."""

    def __init__(self, url: str, options: Mapping[str, Any]):
        self.url, self.options = url, dict(options)
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options, "_fs": None}

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.url, **self.options)
        return self._fs

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts)

    def listdir(self, path: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    @contextmanager
    def write_atomic(self, path: str) -> Iterator[IO[bytes]]:
        """Write a temp object, then `mv` it (a rename on file systems; copy+delete on S3)."""
        folder, _, name = path.rpartition("/")
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{_TMP}{uuid.uuid4().hex[:12]}-{name}"
        try:
            with self.fs.open(tmp, "wb") as handle:
                yield handle
            self.fs.mv(tmp, path)
        except BaseException:
            with suppress(Exception):
                self.fs.rm(tmp)
            raise

    def remove(self, path: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm(path)

    def stat(self, path: str) -> tuple[int, float] | None:
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, OSError):
            return None
        mtime = info.get("mtime") or info.get("created") or info.get("LastModified") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return int(info.get("size") or 0), float(mtime)

    def rmtree(self, path: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


# --- the store ----------------------------------------------------------------------------

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(name: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(name, threading.Lock())


class CacheStore:
    """Stage outputs by key. Picklable (workers of the processes scheduler write entries)."""

    def __init__(self, root: str, fs: _LocalFS | None = None, *, display: str | None = None):
        self.root = root
        self.fs = fs or _LocalFS()
        self.display = display or root
        self.entries_dir = self.fs.join(root, "entries")  # manifests: listed once per run
        self.values_dir = self.fs.join(root, "values")

    def __repr__(self) -> str:
        return f"<CacheStore {self.display}>"

    def _path(self, key: str, suffix: str) -> str:
        folder = self.values_dir if suffix == ".pkl" else self.entries_dir
        return self.fs.join(folder, f"{key}{suffix}")

    def _last_path(self, pipeline: str, stage: str) -> str:
        return self.fs.join(self.root, "last", quote(pipeline, safe=""), f"{stage}.json")

    # reading ---------------------------------------------------------------------------

    def keys(self) -> set[str]:
        """Keys with a committed manifest: one directory listing, no file reads."""
        return {
            name[:-5]
            for name in self.fs.listdir(self.entries_dir)
            if name.endswith(".json") and not name.startswith(_TMP)
        }

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The entry's manifest, or None when there is no (readable) entry."""
        try:
            found = json.loads(self.fs.read(self._path(key, ".json")))
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) and found.get("key") == key else None

    def check(self, key: str, manifest: Mapping[str, Any] | None = None) -> str | None:
        """Why the entry is unusable ("no entry", "corrupt entry ..."), or None if it looks whole."""
        manifest = manifest if manifest is not None else self.manifest(key)
        if manifest is None:
            exists = self.fs.stat(self._path(key, ".json")) is not None
            return "corrupt entry (unreadable manifest)" if exists else "no entry"
        found = self.fs.stat(self._path(key, ".pkl"))
        if found is None:
            return "corrupt entry (value file missing)"
        if found[0] != manifest.get("size"):
            return (
                f"corrupt entry (value has {found[0]} bytes, manifest says {manifest.get('size')})"
            )
        return None

    def load(self, key: str, manifest: Mapping[str, Any] | None = None) -> Any:
        """The stored value; CacheEntryError when it is missing, truncated or corrupt."""
        import cloudpickle

        manifest = manifest if manifest is not None else self.manifest(key)
        if manifest is None:
            raise CacheEntryError(f"cache entry {key[:12]} has no readable manifest")
        try:
            data = self.fs.read(self._path(key, ".pkl"))
        except OSError as exc:
            raise CacheEntryError(f"cache entry {key[:12]}: {exc}") from exc
        if len(data) != manifest.get("size"):
            raise CacheEntryError(
                f"cache entry {key[:12]} is truncated: {len(data)} of {manifest.get('size')} bytes"
            )
        try:
            return cloudpickle.loads(data)
        except Exception as exc:
            raise CacheEntryError(
                f"cache entry {key[:12]} cannot be unpickled ({type(exc).__name__}: {exc})"
            ) from exc

    def last(self, pipeline: str, stage: str) -> dict[str, Any] | None:
        """What `stage` of `pipeline` was last computed from (for explain's diffs)."""
        try:
            found = json.loads(self.fs.read(self._last_path(pipeline, stage)))
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    # writing ---------------------------------------------------------------------------

    def put(self, key: str, value: Any, info: Mapping[str, Any]) -> dict[str, Any]:
        """Store `value` under `key`: value file, then manifest, then the stage's last pointer."""
        import cloudpickle

        with self.fs.write_atomic(self._path(key, ".pkl")) as handle:
            cloudpickle.dump(value, handle, protocol=5)
            size = handle.tell()
        manifest = {
            **info,
            "key": key,
            "format": FORMAT,
            "created": time.time(),
            "size": size,
            "python": sys.version.split()[0],
            "pickle": {"library": "cloudpickle", "version": cloudpickle.__version__, "protocol": 5},
            "annotations": {},
        }
        self._write_json(self._path(key, ".json"), manifest)
        if info.get("pipeline") and info.get("stage"):
            last = {k: v for k, v in manifest.items() if k != "annotations"}
            self._write_json(self._last_path(info["pipeline"], info["stage"]), last)
        return manifest

    def annotate(self, key: str, note: Mapping[str, Any]) -> bool:
        """Merge `note` into the entry's `annotations` (atomically, thread-safe); False if no entry.

        Tracking calls this from its writer thread to remember the MLflow run and model
        version an entry produced, so a later cache hit can reuse that version.
        """
        with _lock(f"{self.root}|{key}"):
            manifest = self.manifest(key)
            if manifest is None:
                return False
            annotations = manifest.get("annotations")
            annotations = dict(annotations) if isinstance(annotations, dict) else {}
            annotations.update({str(k): plain(v) for k, v in note.items()})
            manifest["annotations"] = annotations
            self._write_json(self._path(key, ".json"), manifest)
            return True

    def remove(self, key: str) -> None:
        """Delete an entry (manifest first, so no reader sees a manifest without its value)."""
        self.fs.remove(self._path(key, ".json"))
        self.fs.remove(self._path(key, ".pkl"))

    def _write_json(self, path: str, data: Mapping[str, Any]) -> None:
        text = json.dumps(data, sort_keys=True, default=repr).encode()
        with self.fs.write_atomic(path) as handle:
            handle.write(text)

    # housekeeping ----------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every entry's manifest (unreadable ones as {'key', 'corrupt': True}), oldest first."""
        found = []
        for key in self.keys():
            manifest = self.manifest(key)
            if manifest is None:
                stat = self.fs.stat(self._path(key, ".pkl"))
                manifest = {"key": key, "corrupt": True, "size": stat[0] if stat else 0}
                manifest["created"] = stat[1] if stat else 0.0
            found.append(manifest)
        return sorted(found, key=lambda m: m.get("created") or 0.0)

    def orphans(self, min_age: float = 3600.0) -> list[str]:
        """Value and temp files without a manifest, older than `min_age` seconds (from killed
        runs); younger ones may belong to a run still writing."""
        keys = self.keys()
        now = time.time()
        out = []
        for folder in (self.entries_dir, self.values_dir):
            for name in self.fs.listdir(folder):
                if not name.startswith(_TMP) and name.rsplit(".", 1)[0] in keys:
                    continue
                path = self.fs.join(folder, name)
                stat = self.fs.stat(path)
                if stat is not None and now - stat[1] >= min_age:
                    out.append(path)
        return out

    def prune(
        self, older_than: float | None = None, max_size: int | None = None
    ) -> tuple[int, int]:
        """Remove entries older than `older_than` seconds, then the oldest until the total is
        at most `max_size` bytes, then orphaned files. Returns (entries removed, bytes freed)."""
        now = time.time()
        entries = self.entries()
        doomed: list[dict[str, Any]] = []
        keep: list[dict[str, Any]] = []
        for entry in entries:
            age = now - float(entry.get("created") or 0.0)
            (doomed if older_than is not None and age > older_than else keep).append(entry)
        if max_size is not None:
            total = sum(int(e.get("size") or 0) for e in keep)
            while keep and total > max_size:
                oldest = keep.pop(0)
                total -= int(oldest.get("size") or 0)
                doomed.append(oldest)
        freed = 0
        for entry in doomed:
            self.remove(entry["key"])
            freed += int(entry.get("size") or 0)
        for path in self.orphans():
            stat = self.fs.stat(path)
            self.fs.remove(path)
            freed += stat[0] if stat else 0
        return len(doomed), freed

    def clear(self) -> int:
        """Remove every entry and last pointer; returns how many entries there were."""
        count = len(self.keys())
        self.fs.rmtree(self.entries_dir)
        self.fs.rmtree(self.values_dir)
        self.fs.rmtree(self.fs.join(self.root, "last"))
        return count


def open_store(
    section: Mapping[str, Any], *, pipeline: str | None = None, base: str | None = None
) -> CacheStore | None:
    """The store a `cache` config section asks for, or None when caching is off.

    Relative local paths resolve against `base` (default: the directory the run started
    in, also inside Hydra jobs), so sweep jobs share one cache.
    """
    if not section:
        return None
    backend = backend_name(section, "local")
    if backend not in BACKEND_KEYS:
        raise CacheConfigError(
            f"{where(pipeline, key='cache.backend')} '{backend}' is unknown"
            f"{did_you_mean(str(backend), BACKEND_KEYS)}; use one of {', '.join(BACKEND_KEYS)} "
            f"(e.g. cache=local, or cache.backend=fsspec cache.url=s3://bucket/cache)"
        )
    for key in section:
        if key not in BACKEND_KEYS[backend]:
            raise CacheConfigError(
                f"{where(pipeline, key=f'cache.{key}')} is not a setting of the '{backend}' "
                f"backend{did_you_mean(str(key), BACKEND_KEYS[backend])}; it takes "
                f"{', '.join(sorted(BACKEND_KEYS[backend]))}"
            )
    if backend == "off":
        return None
    if backend == "local":
        path = section.get("path") or ".pipekit/cache"
        if not isinstance(path, str):
            raise CacheConfigError(f"{where(pipeline, key='cache.path')} must be a directory path")
        root = Path(path).expanduser()
        if not root.is_absolute():
            root = Path(base or original_cwd()) / root
        return CacheStore(str(root))
    url = section.get("url")
    if not isinstance(url, str) or ("://" not in url and not url.startswith("/")):
        raise CacheConfigError(
            f"{where(pipeline, key='cache.url')} must be an fsspec URL such as "
            f"file:///shared/cache, s3://bucket/cache or memory://cache, got {url!r}"
        )
    options = section.get("options") or {}
    if not isinstance(options, Mapping):
        raise CacheConfigError(f"{where(pipeline, key='cache.options')} must be a mapping")
    fs = _FsspecFS(url, options)
    root = fs.fs._strip_protocol(url)
    return CacheStore(str(root).rstrip("/") or "/", fs, display=url)


def original_cwd() -> str:
    """The directory the run started in: Hydra's original cwd inside a Hydra job."""
    module = sys.modules.get("hydra.core.hydra_config")
    if module is not None and module.HydraConfig.initialized():
        from hydra.utils import get_original_cwd

        try:
            return get_original_cwd()
        except ValueError:
            pass
    return os.getcwd()


# --- planning: keys and reasons -----------------------------------------------------------


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


def static_key_parts(pipeline: Pipeline) -> dict[str, str]:
    """The part of each stage's key a Pipeline object fixes (target, params, edges):
    computed once per Pipeline, so re-runs only hash code, watched files and upstream keys."""
    parts = {}
    for name, stage in pipeline.stages.items():
        edges = ",".join(f"{arg}={ref}" for arg, ref in stage.inputs.items())
        params = value_token(dict(stage.params)) if stage.params else ""
        parts[name] = "|".join(
            (f"v{FORMAT}", pipeline.name, name, stage.target, params, edges, ",".join(stage.after))
        )
    return parts


class Planner:
    """Fingerprints the planned stages in order and decides, per stage, run or cached."""

    def __init__(self, pipeline: Pipeline, store: CacheStore | None):
        self.pipeline = pipeline
        self.store = store
        self.keys: dict[str, str] = {}
        self._code: dict[str, dict[str, str]] = {}
        self._watch: dict[str, dict[str, str]] = {}

    def fingerprint(self, stages: Sequence[str]) -> dict[str, str]:
        """Keys of `stages` (topological order, upstream-closed), remembering what went
        into each so `info()` can describe it for manifests and explain."""
        pipeline = self.pipeline
        spec_stages = pipeline.stages
        funcs = pipeline._funcs or {}
        static = pipeline._cache_static()
        code_memo: dict[int, tuple[str, dict[str, str]]] = {}
        root = original_cwd()
        keys, code, watch = self.keys, self._code, self._watch
        deps = pipeline.graph.deps
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
        stage = self.pipeline.stages[name]
        return {
            "pipeline": self.pipeline.name,
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
        spec_stages = self.pipeline.stages
        forced = set(stages) if force is True else set(force or ())
        present = store.keys() if store is not None else set()
        deps = self.pipeline.graph.deps
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
            f"{where(self.pipeline.name, stage)}: cache entry {key[:12]} is unusable "
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
        last = store.last(self.pipeline.name, name) if store is not None else None
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


def _cached_reason(manifest: Mapping[str, Any] | None) -> str:
    if not manifest:
        return "unchanged"
    return f"unchanged since {age(time.time() - float(manifest.get('created') or 0))} ago"


def age(seconds: float) -> str:
    """'3m', '2h', '5d': how long ago, for listings and reasons."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


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


# --- tasks --------------------------------------------------------------------------------


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
        from .execute import Failed, Skipped

        output = self.task(*upstream)
        if not isinstance(output, (Failed, Skipped)):
            try:
                self.store.put(self.key, output, self.info)
            except Exception as exc:
                warnings.warn(
                    f"{where(self.info.get('pipeline'), self.info.get('stage'))}: output not "
                    f"cached ({type(exc).__name__}: {exc})",
                    CacheWarning,
                    stacklevel=2,
                )
        return output


class Value:
    """A task returning an already loaded value (a literal in a task tuple could be read
    as a key or a task)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __reduce__(self):
        return (Value, (self.value,))

    def __call__(self) -> Any:
        return self.value


# --- the `cache` config-free helpers for the CLI ------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.I)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' (or plain seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration; use e.g. 7d, 12h, 30m, 45s")
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return float(match.group(1)) * units[match.group(2).lower()]


def parse_size(text: str) -> int:
    """'1GB', '500MB', '10k', '123' (bytes; units are powers of 1024) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a size; use e.g. 1GB, 500MB, 10k")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024**power)


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def cache_listing(store: CacheStore) -> str:
    """`pipekit cache ls`: one line per entry, oldest first, and the total."""
    entries = store.entries()
    total = sum(int(e.get("size") or 0) for e in entries)
    head = f"cache {store.display}: {len(entries)} entries, {human_size(total)}"
    if not entries:
        return head
    now = time.time()
    rows = [("pipeline", "stage", "key", "size", "age", "notes")]
    for entry in entries:
        notes = entry.get("annotations") or {}
        shown = "corrupt" if entry.get("corrupt") else ""
        if isinstance(notes, dict) and notes.get("model_version"):
            shown = f"{notes.get('model_name')}/{notes['model_version']}"
        rows.append(
            (
                str(entry.get("pipeline", "?")),
                str(entry.get("stage", "?")),
                str(entry["key"])[:12],
                human_size(int(entry.get("size") or 0)),
                age(now - float(entry.get("created") or 0.0)),
                shown,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join([head, *lines])


__all__ = [
    "CacheStore",
    "Plan",
    "Planner",
    "StagePlan",
    "StoreTask",
    "Value",
    "open_store",
    "original_cwd",
    "parse_duration",
    "parse_size",
]

"""The stage cache store: stage outputs by key, written atomically.

An entry is `values/<key>.pkl` (cloudpickle) plus `entries/<key>.json` (the manifest),
each written to a temp file and renamed into place, manifest last: an entry exists only
once both are complete, so a killed run leaves no half entry.
`last/<pipeline>/<stage>.json` remembers what the stage was last computed from, so
`explain` can say "params changed: C 1.0 → 0.5".
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from ..core.spec import backend_name
from ..core.text import age, human_size, table
from ..errors import CacheConfigError, CacheEntryError, did_you_mean, where

#: Bump when the key recipe or the entry format changes: old entries become misses.
FORMAT = 1

BACKEND_KEYS: dict[str, set[str]] = {
    "off": {"backend"},
    "local": {"backend", "path"},
    "fsspec": {"backend", "url", "options"},
}

_TMP = ".tmp-"

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
        }
        self._write_json(self._path(key, ".json"), manifest)
        if info.get("pipeline") and info.get("stage"):
            self._write_json(self._last_path(info["pipeline"], info["stage"]), manifest)
        return manifest

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


def listing(store: CacheStore, notes: Mapping[str, str] | None = None) -> str:
    """`pipekit cache ls`: one line per entry, oldest first, and the total; `notes` adds
    a column by key (e.g. the MLflow model version an entry produced)."""
    entries = store.entries()
    total = sum(int(e.get("size") or 0) for e in entries)
    head = f"cache {store.display}: {len(entries)} entries, {human_size(total)}"
    if not entries:
        return head
    notes = notes or {}
    now = time.time()
    rows = [("pipeline", "stage", "key", "size", "age", "notes")]
    for entry in entries:
        key = str(entry["key"])
        rows.append(
            (
                str(entry.get("pipeline", "?")),
                str(entry.get("stage", "?")),
                key[:12],
                human_size(int(entry.get("size") or 0)),
                age(now - float(entry.get("created") or 0.0)),
                "corrupt" if entry.get("corrupt") else notes.get(key, ""),
            )
        )
    return "\n".join([head, table(rows)])

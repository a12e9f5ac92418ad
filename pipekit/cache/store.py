"""The stage cache store: stage outputs by key, written atomically, verified on load.

An entry is `values/<key>.pkl` (cloudpickle) plus `entries/<key>.json` (the manifest),
each written to a temp file and renamed into place, manifest last: an entry exists only
once both are complete, so a killed run leaves no half entry. The manifest records the
value's size and blake2b checksum; a value that does not match is never unpickled.
`last/<pipeline>/<stage>.json` remembers what the stage was last computed from, so
`explain` can say "params changed: C 1.0 → 0.5".

The root holds a marker file, `.pipekit-cache`, written with the first entry: `clear` and
`prune` work only in a directory that has it, and remove only files of the shapes the
store writes, so a mistyped `--path` or a user's file in `values/` is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import quote

from ..core.sections import checked
from ..core.text import age, human_size, table
from ..errors import CacheConfigError, CacheEntryError, CacheNotOursError, where

#: Bump when the key recipe or the entry format changes: old entries become misses.
#: 2: constants of every kind in the code fingerprint, value checksums, the root marker.
FORMAT = 2

#: The file at a cache root that says "pipekit's cache": clear/prune need it.
MARKER = ".pipekit-cache"
#: The checksum recorded in manifests (of the value file's bytes).
CHECKSUM = "blake2b"
#: The folders under a cache root that hold the store's files.
FOLDERS = ("entries", "values", "last")

_TMP = ".tmp-"
_KEY_FILE = re.compile(r"[0-9a-f]{16,128}\.(json|pkl)")

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

    def scan(self, path: str) -> list[tuple[str, bool, int, float]]:
        """(name, is a directory, size, mtime) of what folder `path` holds; [] if none."""
        found = []
        try:
            with os.scandir(path) as items:
                for item in items:
                    with suppress(OSError):
                        st = item.stat(follow_symlinks=False)
                        is_dir = item.is_dir(follow_symlinks=False)
                        found.append((item.name, is_dir, st.st_size, st.st_mtime))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return found

    def rmdir(self, path: str) -> None:
        """Remove folder `path` if it is empty (never its contents)."""
        with suppress(OSError):
            os.rmdir(path)

    def local_path(self, path: str) -> str | None:
        """The real path on this machine's disk, or None for a remote store."""
        return os.path.realpath(path)


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

    def scan(self, path: str) -> list[tuple[str, bool, int, float]]:
        try:
            items = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for info in items:
            name = str(info.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            mtime = info.get("mtime") or info.get("created") or info.get("LastModified") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            is_dir = info.get("type") == "directory"
            found.append((name, is_dir, int(info.get("size") or 0), float(mtime)))
        return found

    def rmdir(self, path: str) -> None:
        with suppress(Exception):  # object stores have no folders to remove
            if self.fs.isdir(path) and not self.fs.ls(path, detail=False):
                self.fs.rmdir(path)

    def local_path(self, path: str) -> str | None:
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return os.path.realpath(path) if {"file", "local"} & set(protocols) else None


# --- the store ----------------------------------------------------------------------------


class CacheStore:
    """Stage outputs by key. Picklable (workers of the processes scheduler write entries)."""

    def __init__(self, root: str, fs: _LocalFS | None = None, *, display: str | None = None):
        self.root = root
        self.fs = fs or _LocalFS()
        self.display = display or root
        self.entries_dir = self.fs.join(root, "entries")  # manifests: listed once per run
        self.values_dir = self.fs.join(root, "values")
        self._marked = False  # the root's marker file is known to exist

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
        recorded = manifest.get("checksum")
        if not isinstance(recorded, str) or not recorded.startswith(f"{CHECKSUM}:"):
            raise CacheEntryError(f"cache entry {key[:12]} has no {CHECKSUM} checksum to verify")
        if f"{CHECKSUM}:{_checksum(data).hexdigest()}" != recorded:  # before unpickling it
            raise CacheEntryError(
                f"cache entry {key[:12]} fails its {CHECKSUM} checksum: the value file is not "
                f"the one written for this key (replaced, swapped or damaged)"
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

        self.mark()
        with self.fs.write_atomic(self._path(key, ".pkl")) as handle:
            sink = _Checksummed(handle)
            cloudpickle.dump(value, sink, protocol=5)
        manifest = {
            **info,
            "key": key,
            "format": FORMAT,
            "created": time.time(),
            "size": sink.size,
            "checksum": f"{CHECKSUM}:{sink.hasher.hexdigest()}",
            "python": sys.version.split()[0],
            "pickle": {"library": "cloudpickle", "version": cloudpickle.__version__, "protocol": 5},
        }
        self._write_json(self._path(key, ".json"), manifest)
        if info.get("pipeline") and info.get("stage"):
            self._write_json(self._last_path(info["pipeline"], info["stage"]), manifest)
        return manifest

    def remember(self, pipeline: str, stage: str, info: Mapping[str, Any]) -> None:
        """Update the stage's last pointer with `info` (a stage that stores no value, such as
        a `cache: false` one, records its output digest there for `explain`)."""
        self.mark()
        self._write_json(self._last_path(pipeline, stage), {**info, "created": time.time()})

    def mark(self) -> None:
        """Write the marker file that makes the root recognisably pipekit's cache (once)."""
        if self._marked:
            return
        path = self.fs.join(self.root, MARKER)
        if self.fs.stat(path) is None:
            with self.fs.write_atomic(path) as handle:
                handle.write(f"pipekit cache\nformat {FORMAT}\n".encode())
        self._marked = True

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

    def files(self) -> tuple[list[tuple[str, int, float]], list[str]]:
        """The store's own files under entries/, values/ and last/ as (path, size, mtime),
        and everything else found there (relative paths): what `clear` must not touch."""
        ours: list[tuple[str, int, float]] = []
        foreign: list[str] = []
        for folder, suffix in (("entries", ".json"), ("values", ".pkl")):
            base = self.fs.join(self.root, folder)
            for name, is_dir, size, mtime in self.fs.scan(base):
                if not is_dir and (
                    name.startswith(_TMP) or (name.endswith(suffix) and _KEY_FILE.fullmatch(name))
                ):
                    ours.append((self.fs.join(base, name), size, mtime))
                else:
                    foreign.append(f"{folder}/{name}")
        last = self.fs.join(self.root, "last")
        for pipeline, is_dir, _, _ in self.fs.scan(last):
            if not is_dir:
                foreign.append(f"last/{pipeline}")
                continue
            base = self.fs.join(last, pipeline)
            for name, inner_dir, size, mtime in self.fs.scan(base):
                if not inner_dir and (name.endswith(".json") or name.startswith(_TMP)):
                    ours.append((self.fs.join(base, name), size, mtime))
                else:
                    foreign.append(f"last/{pipeline}/{name}")
        return ours, sorted(foreign)

    def claim(self, action: str) -> bool:
        """Check that `action` (clear, prune) may remove files here, else CacheNotOursError.

        Refused: `/`, the home directory (or a folder above it), a directory without the
        marker file, one holding files pipekit did not write. A cache made before the
        marker existed (only pipekit's files, with pipekit manifests) is adopted: the
        marker is written and True returned.
        """
        shown = self.display
        local = self.fs.local_path(self.root)
        home = os.path.realpath(os.path.expanduser("~"))
        if self.root.strip("/") == "" or (
            local is not None
            and (local == os.sep or home == local or home.startswith(local + os.sep))
        ):
            raise CacheNotOursError(
                f"refusing to {action} {shown}: it is the root or home directory, never a "
                f"cache; pass the cache directory itself, e.g. --path .pipekit/cache"
            )
        if self.fs.stat(self.root) is None and not self.fs.scan(self.root):
            raise CacheNotOursError(
                f"there is no cache at {shown}: nothing to {action} (check --path/--url)"
            )
        _, foreign = self.files()
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise CacheNotOursError(
                f"refusing to {action} {shown}: it holds files pipekit did not write "
                f"({', '.join(foreign[:3])}{more}); move them out of the cache first, "
                f"nothing was removed"
            )
        if self.fs.stat(self.fs.join(self.root, MARKER)) is not None:
            return False
        if not self._old_cache():
            raise CacheNotOursError(
                f"refusing to {action} {shown}: it is not a pipekit cache (no {MARKER} file); "
                f"pipekit removes files only from caches it created"
            )
        self.mark()
        return True

    def _old_cache(self) -> bool:
        """A cache written before the marker existed: it has a pipekit manifest."""
        for key in sorted(self.keys())[:20]:
            manifest = self.manifest(key)
            if manifest and "pickle" in manifest and "format" in manifest:
                return True
        return False

    def orphans(self, min_age: float = 3600.0) -> list[str]:
        """The store's value and temp files without a manifest, older than `min_age` seconds
        (from killed runs); younger ones may belong to a run still writing."""
        keys = self.keys()
        now = time.time()
        out = []
        for folder in (self.entries_dir, self.values_dir):
            for name, is_dir, _, mtime in self.fs.scan(folder):
                if is_dir or not (name.startswith(_TMP) or _KEY_FILE.fullmatch(name)):
                    continue  # not a file the store writes
                if not name.startswith(_TMP) and name.rsplit(".", 1)[0] in keys:
                    continue
                if now - mtime >= min_age:
                    out.append(self.fs.join(folder, name))
        return out

    def prune(self, older_than: float | None = None, max_size: int | None = None) -> Removed:
        """Remove entries older than `older_than` seconds, then the oldest until the total is
        at most `max_size` bytes, then orphaned files. Only in a directory `claim` accepts."""
        self.claim("prune")
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
        files = freed = 0
        for entry in doomed:
            key = entry["key"]
            for path in (self._path(key, ".json"), self._path(key, ".pkl")):
                stat = self.fs.stat(path)
                if stat is not None:
                    files, freed = files + 1, freed + stat[0]
            self.remove(key)
        for path in self.orphans():
            stat = self.fs.stat(path)
            self.fs.remove(path)
            files, freed = files + 1, freed + (stat[0] if stat else 0)
        return Removed(len(doomed), files, freed)

    def clear(self) -> Removed:
        """Remove every entry, last pointer and temp file (only the store's own files, only
        in a directory `claim` accepts); the marker stays."""
        self.claim("clear")
        entries = len(self.keys())
        ours, _ = self.files()
        order = {"entries": 0, "values": 1, "last": 2}  # manifests first: no half entry seen
        ours.sort(key=lambda f: order.get(f[0][len(self.root) :].strip("/\\").split("/")[0], 3))
        for path, _, _ in ours:
            self.fs.remove(path)
        last = self.fs.join(self.root, "last")
        for pipeline, is_dir, _, _ in self.fs.scan(last):
            if is_dir:
                self.fs.rmdir(self.fs.join(last, pipeline))
        for folder in FOLDERS:
            self.fs.rmdir(self.fs.join(self.root, folder))
        return Removed(entries, len(ours), sum(size for _, size, _ in ours))


class Removed(NamedTuple):
    """What `clear`/`prune` removed: entries, files (with temp files), bytes."""

    entries: int
    files: int
    bytes: int


class _Checksummed:
    """A write-only file wrapper that counts and hashes what goes through it."""

    __slots__ = ("handle", "hasher", "size")

    def __init__(self, handle: IO[bytes]):
        self.handle, self.hasher, self.size = handle, _checksum(b""), 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hasher.update(view)
        self.size += view.nbytes
        return self.handle.write(data)


def _checksum(data: bytes) -> Any:
    return hashlib.blake2b(data, digest_size=32)


def value_checksum(value: Any) -> str:
    """The checksum `put` records for `value` (its cloudpickle, protocol 5): the content
    digest of a stage's output, computed the same way where no entry is written."""
    import cloudpickle

    sink = _Checksummed(_Discard())
    cloudpickle.dump(value, sink, protocol=5)
    return f"{CHECKSUM}:{sink.hasher.hexdigest()}"


class _Discard:
    """A file that keeps nothing (hashing a pickle without holding its bytes)."""

    def write(self, data: Any) -> int:
        return memoryview(data).nbytes


def open_store(
    section: Mapping[str, Any], *, pipeline: str | None = None, base: str | None = None
) -> CacheStore | None:
    """The store a `cache` config section asks for, or None when caching is off.

    Relative local paths resolve against `base` (default: the directory the run started
    in, also inside Hydra jobs), so sweep jobs share one cache.
    """
    if not section:
        return None
    values = checked(pipeline, "cache", section)  # the shared schema: keys, types, URL
    backend = values["backend"]
    if backend == "off":
        return None
    if backend == "local":
        root = Path(values["path"] or ".pipekit/cache").expanduser()
        if not root.is_absolute():
            root = Path(base or original_cwd()) / root
        return CacheStore(str(root))
    url, options = values["url"], values["options"] or {}
    fs = _FsspecFS(url, options)
    try:
        root = fs.fs._strip_protocol(url)
    except Exception as exc:  # a missing package, bad options, unreachable credentials...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CacheConfigError(
            f"{where(pipeline, key='cache.url')} '{url}' cannot be opened with fsspec "
            f"({type(exc).__name__}{f': {detail}' if detail else ''}); check the URL, the "
            f"packages its protocol needs and cache.options"
        ) from exc
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

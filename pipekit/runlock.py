"""One run of a pipeline at a time per cache: a cron-started run that finds the previous
one still going waits for it (`concurrency: wait`, the default) or skips (`skip`).

The lock is an `fcntl.flock` on `<cache dir>/locks/<pipeline>.lock` (a local cache), or on
`.pipekit/locks/<pipeline>[-<url hash>].lock` in the directory the run starts in (an
fsspec cache, or none). The kernel drops it when the holder exits, however it exits, so
a killed run never leaves a stale lock. It serialises runs on one machine; on several,
let the scheduler do it (the exported Airflow DAG sets `max_active_runs=1`).

A merged sweep (`pipekit run -m`, `pk.sweep`) is one run of the pipeline as far as the
lock goes: it holds the lock of its jobs' pipeline and cache (`run_locks`) for the whole
merged graph, and waits or skips as a single run would.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from .core.spec import PipelineSpec, backend_name
from .errors import ConcurrencyConfigError, ConfigTypeError, RunSkipped, did_you_mean, where

#: What a run does while another run of the same pipeline and cache holds the lock.
MODES = ("wait", "skip")

_held = threading.local()  # lock paths this thread holds: a nested run does not deadlock

F = TypeVar("F", bound=Callable[..., Any])


def check_concurrency(spec: PipelineSpec) -> str:
    """The pipeline's `concurrency` mode ('wait' when unset), or a ConfigError naming it."""
    value = spec.config.get("concurrency")
    if value is None:
        return "wait"
    if not isinstance(value, str):
        raise ConfigTypeError(
            f"{where(spec.name, key='concurrency')} must be one of {', '.join(MODES)}, "
            f"got {type(value).__name__} {value!r}"
        )
    if value not in MODES:
        raise ConcurrencyConfigError(
            f"{where(spec.name, key='concurrency')} '{value}' is unknown"
            f"{did_you_mean(value, MODES)}; use wait (queue behind a run still going) or "
            f"skip (exit without running), e.g. concurrency=skip"
        )
    return value


def lock_path(spec: PipelineSpec) -> Path:
    """The lock file of this pipeline and cache (see the module docstring)."""
    from .cache.store import original_cwd

    section = spec.section("cache")
    backend = backend_name(section, "off") if section else "off"
    name = _safe(spec.name)
    if backend == "local":
        root = Path(section.get("path") or ".pipekit/cache").expanduser()
        if not root.is_absolute():
            root = Path(original_cwd()) / root
        return root / "locks" / f"{name}.lock"
    folder = Path(original_cwd()) / ".pipekit" / "locks"
    url = section.get("url") if backend == "fsspec" else None
    if isinstance(url, str) and url:
        return folder / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.lock"
    return folder / f"{name}.lock"


@contextmanager
def run_lock(spec: PipelineSpec, *, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the pipeline's run lock for the block: wait for it or raise RunSkipped."""
    mode = check_concurrency(spec)
    path = lock_path(spec)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if str(path) in held:  # this thread already holds it (a run inside a run)
        yield
        return
    say = say or _stderr
    try:
        handle = _open(path)
    except OSError as exc:  # a read-only directory: run, but never silently unguarded
        say(
            f"pipekit: {where(spec.name)}: no run lock ({_shown(path)}: {exc.strerror or exc}); "
            f"running without one, so a concurrent run is not held back"
        )
        yield
        return
    try:
        if not _try_lock(handle):
            holder = _holder(path)
            if mode == "skip":
                raise RunSkipped(
                    f"{where(spec.name)}: skipped: the previous run ({holder}) still holds "
                    f"{_shown(path)}; nothing ran (concurrency: skip; concurrency=wait queues "
                    f"behind it instead)"
                )
            say(
                f"pipekit: {where(spec.name)}: waiting for the previous run ({holder}) to "
                f"finish; it holds {_shown(path)} (concurrency: wait)"
            )
            started = time.monotonic()
            _lock(handle)
            say(
                f"pipekit: {where(spec.name)}: the previous run finished after "
                f"{time.monotonic() - started:.1f} s of waiting; starting"
            )
        _write_holder(handle)
        held.add(str(path))
        try:
            yield
        finally:
            held.discard(str(path))
    finally:
        handle.close()  # closing the file releases the lock


@contextmanager
def run_locks(
    specs: Iterable[PipelineSpec], *, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the run lock of every pipeline and cache among `specs` for the block (a merged
    sweep: usually one lock; jobs that sweep `cache.path` touch several caches). Taken in
    path order, so two sweeps never each hold one and wait for the other."""
    chosen: dict[str, PipelineSpec] = {}
    for spec in specs:
        chosen.setdefault(str(lock_path(spec)), spec)
    with ExitStack() as stack:
        for path in sorted(chosen):
            stack.enter_context(run_lock(chosen[path], say=say))
        yield


def locked(run: F) -> F:
    """Decorate `Pipeline.run`: validate, then run holding the pipeline's run lock."""

    @functools.wraps(run)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:  # self: a Pipeline
        self.validate()  # a config error says so at once, not after waiting
        with run_lock(self.spec):
            return run(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# --- the file lock -------------------------------------------------------------------------


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": never truncate what the holder wrote before we hold the lock ourselves
    return open(path, "a+", encoding="utf-8")  # run_lock closes it


def _try_lock(handle: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): say so once, run unlocked
        _unavailable()
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock(handle: IO[str]) -> None:
    import fcntl

    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # Ctrl-C interrupts the wait


@functools.cache
def _unavailable() -> None:
    import warnings

    warnings.warn(
        "pipekit: no run lock on this platform (fcntl is missing): concurrent runs of a "
        "pipeline are not serialised; `concurrency` has no effect",
        RuntimeWarning,
        stacklevel=4,
    )


def _write_holder(handle: IO[str]) -> None:
    """Who holds the lock, for the runs that find it taken."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {stamp}\n")
    handle.flush()


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "holder unknown"


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "pipeline"


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

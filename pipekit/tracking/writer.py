"""Where pipekit's MLflow calls run: one writer per pipeline run, a thread or a process.

The observer's methods that call MLflow (`MlflowObserver._start_parent`, `_open_stage`,
`_close_stage`, `_finish_parent`, `_kill`, ...) are one implementation. This module only
decides where they run, and carries each call there in submission order:

- `ThreadWriter` (notebooks, `Pipeline.run` from Python): a thread of the process that
  runs the pipeline. MLflow's import and calls share the GIL with the stages.
- `ProcessWriter` (`pipekit run`): another process, readied by the CLI before Hydra
  composes the config (`start_early`): a fork of the fork server, which imported MLflow
  once for every run (`forkserver.py`; its program is `serve_forks`), or with
  `PIPEKIT_TRACKING_WRITER=process` a child that imports MLflow on the second core while
  the driver composes, validates and runs the stages (`serve`). The driver pickles the
  observer once (its settings and the run's plan: the child's *mirror*) and then each
  call (method name and arguments, stage outputs reduced to what tracking reads) down a
  socket or pipe; the child runs them on the mirror and, when closed, hands back the
  results (`parent_run_id`, `stage_runs`, `versions`, `failures`, ...). MLflow's log
  lines and prints in the child come back as log records (MLflow's chatter at DEBUG).

Nothing is left RUNNING:
- the driver killed (SIGKILL, OOM) or gone without closing: the child reads EOF, runs the
  calls it had received, then ends its open runs KILLED (`_kill`). It lives in its own
  session, so a signal to the driver's process group does not cut that short;
- the child killed or crashed: the driver sees EOF on its connection, reports it as a
  tracking failure, and ends the runs the child had reported creating (every
  `create_run` and `set_terminated` is reported as it happens) FAILED, through the same
  `_kill`, in its own process. It never waits on a dead child.
"""

from __future__ import annotations

import copyreg
import io
import logging
import os
import pickle
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from ..core.events import StageEvent
from ..core.metrics import numeric_items
from ..core.result import RunResult
from ..errors import PipekitError, TrackingUnavailableError, TrackingWriterError
from . import forkserver
from .client import HTTP_LIMITS, check_reachable, http_limits
from .prewarm import MODULES  # what the child imports first, before it knows the run
from .settings import sqlite_file

log = logging.getLogger(__name__)

#: How long `close` holds back Ctrl-C/SIGTERM while the writer finishes (then interruptible).
GRACE = 30.0


# --- what both transports share -----------------------------------------------------------


class _Calls:
    """Runs calls one at a time; a failure is logged once and kept in `failures`."""

    def __init__(self, uri: str = ""):
        self.failures: list[str] = []
        self.uri = uri
        #: the store stopped answering: the rest of the work is dropped, not retried
        self.gone: str | None = None

    def _call(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self.gone is not None:
            return
        try:
            func(*args)
        except Exception as exc:
            message = failure_text(exc)
            self.failures.append(message)
            debug = log.isEnabledFor(logging.DEBUG)
            log.warning("pipekit tracking: %s", message, exc_info=debug)
            if isinstance(exc, TrackingUnavailableError):
                self.gone = message
            elif self.uri.startswith(("http://", "https://")):
                try:  # one quick look instead of MLflow's retries on every later call
                    check_reachable(self.uri)
                except TrackingUnavailableError as down:
                    self.gone = str(down)
                    log.warning(
                        "pipekit tracking: %s; the run's remaining MLflow calls are dropped", down
                    )


def failure_text(exc: BaseException) -> str:
    """One line for a tracking failure: pipekit's own errors say it all, others get their type."""
    if isinstance(exc, PipekitError):
        return str(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM for the block (main thread only), then hand each one
    caught to the handler it would have reached (Ctrl-C: KeyboardInterrupt; SIGTERM's
    default: the process ends), so ending the MLflow runs is never cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
    except ValueError:  # not allowed here (embedded interpreter)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(caught):  # each signal once, in the order they came
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


# --- the thread -----------------------------------------------------------------------------


class ThreadWriter(_Calls):
    """One thread that performs MLflow calls in submission order."""

    def __init__(self, name: str, uri: str = ""):
        super().__init__(uri)
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        self._queue.put((func, args))

    def close(self, grace: float = GRACE) -> None:
        """Run everything submitted, then stop the thread (waits for it).

        For `grace` seconds a second Ctrl-C or a SIGTERM waits too (then takes effect): it
        must not leave runs RUNNING. After that the wait can be interrupted as usual.
        """
        self._queue.put(None)
        with sigint_deferred():
            self._thread.join(grace)
        self._thread.join()

    def _loop(self) -> None:
        with http_limits():
            while True:
                item = self._queue.get()
                if item is None:
                    return
                self._call(*item)


def open_writer(observer: Any, name: str) -> ThreadWriter | ProcessWriter:
    """The writer for the run `observer` starts: the process `start_early` readied for
    this run (the CLI), or else a thread."""
    global _early
    early, _early = _early, None
    proc = early.peer() if early is not None else None
    if proc is not None:
        if proc.poll() is None:
            try:
                return ProcessWriter(proc, observer, name)
            except Exception as exc:  # e.g. a run that cannot be pickled: a thread will do
                log.debug("pipekit tracking: no writer process (%s); using a thread", exc)
        _discard(proc)
    return ThreadWriter(name, observer.uri)


# --- the process: driver side ---------------------------------------------------------------

#: `forkserver` (the default on Linux): a fork of a long-lived process that imported MLflow
#: once (`forkserver.py`); `process`: a new process per run; `thread`: a thread of the run.
WRITER_ENV = "PIPEKIT_TRACKING_WRITER"
#: The child's program: `serve()` below (not `-m`, which would load this module twice).
CHILD = "from pipekit.tracking.writer import serve; serve()"
#: The fork server's program (`serve_forks` below); the socket's path is its argument.
FORK_SERVER = (
    "import sys; from pipekit.tracking.writer import serve_forks; serve_forks(sys.argv[1])"
)

Peer = subprocess.Popen | forkserver.Session


class _Early:
    """The writer made ready for the next run of this process: a fork of the fork server
    (found or started on a thread, so the driver never waits for it) or a child process."""

    def __init__(self, mode: str):
        self._peer: Peer | None = None
        self._thread: threading.Thread | None = None
        if mode == "forkserver" and forkserver.available():
            self._thread = threading.Thread(
                target=self._connect, name="pipekit-writer-connect", daemon=True
            )
            self._thread.start()
        else:
            self._peer = _spawn()

    def _connect(self) -> None:
        try:
            session = forkserver.connect([sys.executable, "-c", FORK_SERVER])
        except Exception as exc:  # then a writer process of our own, as before
            log.debug("pipekit tracking: no fork server (%s)", exc)
            session = None
        self._peer = session if session is not None else _spawn()

    def peer(self) -> Peer | None:
        if self._thread is not None:
            self._thread.join()  # bounded: forkserver.START_WAIT and ANSWER_WAIT
        return self._peer

    def alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()) or (
            self._peer is not None and self._peer.poll() is None
        )


_early: _Early | None = None
_early_lock = threading.Lock()


def start_early() -> None:
    """Ready a writer now, for the next tracked run of this process to adopt.

    `pipekit run` calls it before composing the config, when nothing says tracking is off,
    and again once the config says it is on (then a no-op). A writer nobody adopts exits
    when this process does (EOF on its pipe), or at once on `discard_early()`.
    """
    global _early
    mode = os.environ.get(WRITER_ENV, "forkserver")
    if mode == "thread":  # MLflow imported in this process
        from .prewarm import prewarm

        prewarm()
        return
    with _early_lock:
        if _early is not None and _early.alive():
            return
        _early = _Early(mode)


def _spawn() -> subprocess.Popen | None:
    """A writer process of this run's own, or None (the run then writes from a thread)."""
    try:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a signal to our process group must not cut its
            close_fds=True,  # cleanup short: it ends when our pipe closes
        )
    except OSError as exc:
        log.debug("pipekit tracking: cannot start a writer process: %s", exc)
        return None


def ready_writer(section: Mapping[str, Any] | None) -> None:
    """Once the config is composed: a writer for the next run when its `tracking`
    section is on (`start_early`; already started unless tracking looked off), else
    none (`discard_early`)."""
    from .prewarm import tracking_on

    if tracking_on(section):
        start_early()
    else:
        discard_early()


def discard_early() -> None:
    """The config says tracking is off: the spare writer (if any) exits now."""
    global _early
    with _early_lock:
        early, _early = _early, None
    proc = early.peer() if early is not None else None
    if proc is not None:
        _discard(proc)


def _discard(proc: Peer) -> None:
    """End a writer that opened nothing (it holds no MLflow run)."""
    if isinstance(proc, forkserver.Session):
        proc.close()  # the fork reads EOF before any run and exits
        return
    with suppress(OSError):
        proc.kill()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        with suppress(OSError):
            if stream is not None:
                stream.close()
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


_OFF = re.compile(
    r"^\s*(?:-\s*)?tracking\s*:\s*['\"]?(off|false|none|null)['\"]?\s*(#.*)?$", re.IGNORECASE
)


def start_if_tracked(
    flags: Sequence[str], overrides: Sequence[str], config_dir: str | None, config_name: str
) -> None:
    """`start_early`, before Hydra composes, unless tracking looks off: an override says
    so (`tracking=off`, `tracking.enabled=false`), or the primary config's defaults list
    does, or Hydra is asked for something other than running (`--cfg`, `--info`)."""
    if set(flags) - {"-m", "--multirun"} or not likely_tracked(
        overrides, _primary_file(config_dir, config_name)
    ):
        return
    start_early()


def _primary_file(config_dir: str | None, config_name: str) -> Path | None:
    from ..config import conf_dir

    if config_dir:
        own = Path(config_dir).expanduser() / f"{config_name}.yaml"
        if own.is_file() or config_name != "config":
            return own
    return conf_dir() / "config.yaml"


def likely_tracked(overrides: Sequence[str], primary: Path | None) -> bool:
    """A guess made before Hydra composes: False when an override or the primary config's
    defaults list turn tracking off. The composed config decides (`discard_early`)."""
    from ..core.spec import backend_name

    chosen = False
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        value = value.strip().strip("'\"")
        off = value.lower() in ("false", "null", "none", "") or (
            backend_name({"backend": value}, "off") == "off"
        )
        if key in ("tracking", "tracking.backend") and sep:
            if off:
                return False
            chosen = True
        if key == "tracking.enabled" and value.lower() in ("false", "0", "no", "off"):
            return False
    if chosen or primary is None:
        return True
    try:
        text = primary.read_text()
    except OSError:
        return True
    return not any(_OFF.match(line) for line in text.splitlines())


class ProcessWriter:
    """The driver's end of a writer process: `submit` and `close` as `ThreadWriter`'s.

    Three threads of the driver serve it, none of which holds the GIL for long: one sends
    the pickled calls (a hook never blocks on the pipe), one reads what the child reports,
    one keeps its stderr (shown in a debug log; its last line names a crash).
    """

    def __init__(self, proc: Peer, observer: Any, name: str):
        self.observer = observer
        self.proc = proc
        self.uri = observer.uri
        self.failures: list[str] = []
        self.gone: str | None = None
        #: run id -> (parent run id or None, stage or None, experiment id), as created
        self.created: dict[str, tuple[str | None, str | None, str]] = {}
        self.ended: set[str] = set()
        self._results: dict[str, Any] | None = None
        self._stderr: deque[str] = deque(maxlen=20)
        self._finished = threading.Event()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        run = getattr(observer, "_run", None)
        self._models = {n for n, s in run.spec.stages.items() if s.model} if run else set()
        state = {k: v for k, v in vars(observer).items() if k not in ("_writer", "_client")}
        hello = ("open", type(observer), state, _context())
        self._outbox.put(_dumps(hello))
        threads = [(self._send, "send"), (self._read, "read")]
        if proc.stderr is not None:  # a fork server's fork prints to the server's log
            threads.append((self._errors, "err"))
        for target, part in threads:
            threading.Thread(target=target, name=f"{name}-{part}", daemon=True).start()

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        if self.gone is not None or self._finished.is_set():
            return
        name = getattr(func, "__name__", "")
        if getattr(func, "__self__", None) is not self.observer:
            raise TypeError(f"a writer process runs methods of its observer, not {func!r}")
        try:
            data = _dumps(("call", name, tuple(self._portable(arg) for arg in args)))
        except Exception:  # pickled once more, what does not pickle replaced (_travels)
            try:
                data = _dumps(("call", name, tuple(self._portable(a, True) for a in args)))
            except Exception as exc:  # a value that will not travel: say so, run the rest
                self.failures.append(
                    f"{name}: not sent to the tracking writer: {failure_text(exc)}"
                )
                log.warning("pipekit tracking: %s", self.failures[-1])
                return
        self._outbox.put(data)

    def close(self, grace: float = GRACE) -> None:
        """Wait until the child ran everything submitted and handed back its results.

        Like `ThreadWriter.close`, a Ctrl-C or SIGTERM waits for `grace` seconds. When
        the child died, end the runs it had reported creating (here, FAILED).
        """
        self._outbox.put(None)
        with sigint_deferred():
            self._finished.wait(grace)
        self._finished.wait()
        if self._results is not None:
            self._apply(self._results)
        else:
            self._recover()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    # the three threads

    def _send(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while True:
                data = self._outbox.get()
                if data is None:
                    _write_frame(stdin, _dumps(("close",)))
                    stdin.close()  # then EOF: the child ends after "close"
                    return
                _write_frame(stdin, data)
        except (OSError, ValueError):  # the child is gone: `_read` says how
            with suppress(OSError):
                stdin.close()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            if isinstance(self.proc, forkserver.Session) and not self.proc.wait_ready():
                return  # the server died before forking: `_recover` says so
            while True:
                frame = _read_frame(stdout)
                if frame is None:
                    break
                message = pickle.loads(frame)
                kind = message[0]
                if kind == "run":
                    _, run_id, experiment, parent, stage = message
                    self.created[run_id] = (parent, stage, experiment)
                elif kind == "ended":
                    self.ended.add(message[1])
                elif kind == "log":
                    _relog(*message[1:])
                elif kind == "done":
                    self._results = message[1]
                    self.failures.extend(message[2])
                    break
        except Exception as exc:  # a broken pipe or frame: the same as a dead child
            log.debug("pipekit tracking: reading the writer process failed: %s", exc)
        finally:
            self._finished.set()

    def _errors(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        with suppress(OSError, ValueError):
            for raw in iter(stderr.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                if line:
                    self._stderr.append(line)
                    log.debug("pipekit tracking writer: %s", line)

    # after the run

    def _apply(self, results: Mapping[str, Any]) -> None:
        """The mirror's public state (`parent_run_id`, `stage_runs`, `versions`, ...)."""
        for key, value in results.items():
            if key == "failures":
                self.observer.failures.extend(value)
            else:
                setattr(self.observer, key, value)

    def _recover(self) -> None:
        """The child died: say so, then end (FAILED) the runs it had reported creating."""
        code = self.proc.poll()
        if code is None:  # alive but not making sense (a broken frame): it must not write on
            with suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=5)
            if code is None:
                with suppress(OSError):
                    self.proc.kill()
                code = self.proc.wait()
        how = f"exit code {code}"
        if code == forkserver.UNKNOWN:
            how = f"pid {self.proc.pid}"
        elif code < 0:
            with suppress(ValueError):
                how = f"killed by {signal.Signals(-code).name}"
        last = next((line for line in reversed(self._stderr) if line.strip()), "")
        if isinstance(self.proc, forkserver.Session):
            last = self.proc.last_words()
        message = f"the tracking writer process ended before the run's MLflow calls ({how})"
        if last:
            message += f": {last}"
        self.gone = message
        self.failures.append(message)
        log.warning("pipekit tracking: %s", message)
        observer = self.observer
        parents = [rid for rid, (parent, _s, _e) in self.created.items() if parent is None]
        if not parents:
            return
        parent = parents[0]
        observer.parent_run_id = parent
        observer.experiment_id = self.created[parent][2]
        for run_id, (up, stage, _e) in self.created.items():
            if up == parent and stage:
                observer.stage_runs[stage] = run_id
                if run_id not in self.ended:
                    observer._open[stage] = 0
        if parent in self.ended:
            return
        fallback = ThreadWriter("pipekit-mlflow-recover", self.uri)
        fallback.submit(observer._kill, TrackingWriterError(message))
        fallback.close()
        self.failures.extend(fallback.failures)

    # what travels

    def _portable(self, value: Any, fallback: bool = False) -> Any:
        """`value` as the child needs it: stage outputs reduced to their metrics (model
        stages keep theirs), exceptions as stand-ins carrying their type name and text.
        `fallback` (once pickling failed): a model output that does not pickle travels as
        a stand-in, and a loader of a cached output that does not pickle stays behind."""
        if isinstance(value, StageEvent):
            output = value.output
            if value.stage not in self._models:
                output = numeric_items(output)
            elif output is not None and fallback:
                output = _travels(output)
            return replace(
                value,
                output=output,
                error=_stand_in(value.error),
                meta=self._meta(value.stage, value.meta, fallback),
            )
        if isinstance(value, RunResult):
            result = RunResult(
                value.pipeline,
                {},
                value.status,
                value.durations,
                {k: _stand_in(v) for k, v in value.errors.items()},
                value.run_id,
                value.reasons,
            )
            result.tracking = dict(value.tracking)
            return result
        if isinstance(value, BaseException):
            return _stand_in(value)
        return value

    def _meta(self, stage: str, meta: Mapping[str, Any], fallback: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in meta.items():
            if callable(value):  # a loader of the cached output: only model stages use it
                if stage in self._models and (not fallback or _pickles(value)):
                    out[key] = value
            elif isinstance(value, (list, tuple)):
                out[key] = [_stand_in(v) if isinstance(v, BaseException) else v for v in value]
            else:
                out[key] = _stand_in(value) if isinstance(value, BaseException) else value
        return out


#: Loggers whose levels the child takes over from the driver (the root logger first).
_LOGGERS = ("", "pipekit", "pipekit.tracking.observer", __name__)


def _context() -> dict[str, Any]:
    """What the child must share with the driver to run the calls as the driver would."""
    return {
        "cwd": os.getcwd(),
        "path": list(sys.path),
        "env": dict(os.environ),
        "levels": {name: logging.getLogger(name).getEffectiveLevel() for name in _LOGGERS},
    }


def _relog(name: str, level: int, message: str) -> None:
    """A log record of the child, handled by the driver's logging as if logged here."""
    logger = logging.getLogger(name)
    if logger.isEnabledFor(level):
        record = logger.makeRecord(name, level, "(writer process)", 0, message, None, None)
        logger.handle(record)


def _dumps(value: Any) -> bytes:
    """`pickle.dumps`, with read-only mappings (the frozen spec's) pickled as copies."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(value)
    return out.getvalue()


def _read_only(values: dict) -> MappingProxyType:
    return MappingProxyType(values)


_DISPATCH = {**copyreg.dispatch_table, MappingProxyType: lambda m: (_read_only, (dict(m),))}


def _pickles(value: Any) -> bool:
    try:
        _dumps(value)
    except Exception:
        return False
    return True


def _travels(output: Any) -> Any:
    """A model stage's output, or a stand-in whose logging fails as the output's would."""
    try:
        _dumps(output)
        return output
    except Exception:
        pass
    try:
        import cloudpickle

        return _Cloudpickled(cloudpickle.dumps(output))
    except Exception as exc:
        return _Unpicklable(type(output).__name__, str(exc))


class _Cloudpickled:
    """An output only cloudpickle can pickle (a lambda, a class defined in a function)."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return _uncloudpickle, (self.data,)


def _uncloudpickle(data: bytes) -> Any:
    import cloudpickle

    return cloudpickle.loads(data)


class _Unpicklable:
    """Stands for an output that cannot be pickled: pickling it again (to log it as a
    model) fails with the original message, under the original type's name."""

    def __init__(self, type_name: str, reason: str):
        self.type_name, self.reason = type_name, reason

    def __reduce__(self) -> tuple[Any, ...]:
        if getattr(self, "_arrived", False):
            raise TypeError(self.reason)
        return _unpicklable, (self.type_name, self.reason)


def _unpicklable(type_name: str, reason: str) -> Any:
    cls = type(type_name, (_Unpicklable,), {"_arrived": True})
    return cls(type_name, reason)


def _stand_in(error: Any) -> Any:
    """An exception as the child needs it: type name, text, `signame`, KeyboardInterrupt."""
    if not isinstance(error, BaseException):
        return error
    interrupt = isinstance(error, KeyboardInterrupt)
    return _StandIn(type(error).__name__, str(error), interrupt, getattr(error, "signame", None))


class _StandIn(Exception):
    def __init__(self, type_name: str, text: str, interrupt: bool, signame: str | None):
        super().__init__(type_name, text, interrupt, signame)

    def __reduce__(self) -> tuple[Any, ...]:
        return _arrive, self.args


_CLASSES: dict[tuple[str, bool], type] = {}


def _arrive(type_name: str, text: str, interrupt: bool, signame: str | None) -> BaseException:
    """The exception in the child: a class of the same name, whose `str()` is the text."""
    cls = _CLASSES.get((type_name, interrupt))
    if cls is None:
        base = KeyboardInterrupt if interrupt else Exception
        cls = _CLASSES[(type_name, interrupt)] = type(type_name, (base,), {})
    error = cls(text)
    if signame is not None:
        error.signame = signame
    return error


# --- frames: a length and a pickle -----------------------------------------------------------

_LENGTH = struct.Struct("!Q")


def _write_frame(stream: IO[bytes], data: bytes) -> None:
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """The next frame, or None at EOF (also in the middle of a frame: the writer died)."""
    head = _read_exactly(stream, _LENGTH.size)
    if head is None:
        return None
    return _read_exactly(stream, _LENGTH.unpack(head)[0])


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the process: the child's side ----------------------------------------------------------


class DriverGone(KeyboardInterrupt):
    """The pipekit process that started this writer ended without closing it (killed):
    the runs it left open end KILLED."""

    signame = "the pipekit process was killed"


class _Reporting:
    """The MLflow client, reporting each run it creates or ends to the driver at once,
    so a driver whose writer dies still knows which runs to end."""

    def __init__(self, client: Any, send: Callable[[tuple[Any, ...]], None]):
        self._inner = client
        self._send = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_run(self, experiment_id: str, *args: Any, **kwargs: Any) -> Any:
        from . import tags as tag

        run = self._inner.create_run(experiment_id, *args, **kwargs)
        tags = kwargs.get("tags") or (args[1] if len(args) > 1 else None) or {}
        parent = tags.get("mlflow.parentRunId")
        stage = tags.get(tag.STAGE) if parent else None
        self._send(("run", run.info.run_id, str(experiment_id), parent, stage))
        return run

    def set_terminated(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        out = self._inner.set_terminated(run_id, *args, **kwargs)
        self._send(("ended", run_id))
        return out


class _Forward(logging.Handler):
    """The child's log records go to the driver, which logs them as its own."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]):
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(("log", record.name, record.levelno, message))
        except Exception:
            self.handleError(record)


class _Printed:
    """`sys.stdout` of the child: prints (MLflow's `View run ...`) become debug records."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        if text.strip():
            logging.getLogger("mlflow").debug("%s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def serve() -> None:
    """The writer process of one run: import MLflow, then run the driver's calls until it
    closes. The pipe from the driver is stdin, the pipe back a copy of stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # C-level prints cannot corrupt the pipe
    _serve(sys.stdin.buffer, channel)


def serve_forks(sock: str) -> None:
    """The fork server (`forkserver.py`): MLflow and the model modules imported once,
    then each run's writer a fork of this process, served by `_serve` on its socket."""
    forkserver.serve(Path(sock), _prepare_forks, _fork_session, _warm_forks, open_ahead=_open_ahead)


def _prepare_forks() -> None:
    """What a writer needs first, imported before the first fork (the rest, which the
    first forks import as a writer process does, waits for `_warm_forks`). MLflow's
    telemetry is off in the server: its threads must not be running at a fork."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _import(MODULES)


def _warm_forks() -> None:
    """Everything else a run's writer may need, and each kind of MLflow call made once."""
    from .warmup import workout

    _model_modules()
    _requirement_maps()
    _import(("sklearn.base",))  # what pipekit's examples and most model stages pickle
    _import((f"{__package__}.observer", "pipekit.display.render", "graphviz"))  # the mirror
    workout()


def _open_ahead(uri: str) -> None:
    """In the fork server: the SQLAlchemy engines of a local store the next runs will
    open (MLflow keeps one per database), with a run's first reads compiled once, then
    their connections closed, so each fork opens its own. The stores are made here, not
    through `MlflowClient`, whose per-URI cache would spare a fork MLflow's check of the
    tables (a store deleted meanwhile must be created afresh)."""
    from mlflow.entities import ViewType
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Registry
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as Tracking

    from .client import store_lock

    db = sqlite_file(uri)
    if db is None or not db.is_file() or not db.stat().st_size:
        return
    with store_lock(db, wait=1.0):  # a store being created or migrated: not now
        tracking = Tracking(uri, db.parent.as_uri())
        registry = Registry(uri)
    try:
        for experiment in tracking.search_experiments(max_results=1):
            tracking.search_runs([experiment.experiment_id], "", ViewType.ACTIVE_ONLY, 1)
        registry.search_registered_models(max_results=1)
    finally:
        for engine in {tracking.engine, registry.engine}:
            engine.dispose()


def _fork_session(conn: Any) -> None:
    _serve(conn.makefile("rb"), conn.makefile("wb"))


def _serve(source: IO[bytes], channel: IO[bytes]) -> None:
    """Run one driver's calls from `source`, reporting on `channel`, then exit."""
    sys.stdout = _Printed()  # type: ignore[assignment]
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        """To the driver; never raises: with the driver gone, the runs must still end."""
        with lock, suppress(OSError, ValueError):
            _write_frame(channel, _dumps(message))

    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    opened = threading.Event()

    def receive() -> None:  # drains the pipe while MLflow imports: the driver never blocks
        while True:
            frame = _read_frame(source)
            if frame is None and not opened.is_set():
                os._exit(0)  # nobody adopted this process: nothing to end
            inbox.put(frame)
            if frame is None:
                return
            opened.set()

    threading.Thread(target=receive, name="pipekit-writer-inbox", daemon=True).start()
    root = logging.getLogger()
    root.addHandler(_Forward(send))
    root.setLevel(logging.WARNING)
    _import(MODULES)  # at once when forked: the server imported them
    imported = time.monotonic()
    for name in ("mlflow",):  # MLflow's own stderr handler: its records go to the driver
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    with http_limits():
        _Child(send, inbox, imported).loop()
    with suppress(Exception):
        channel.flush()
    os._exit(0)  # MLflow's exit hooks (telemetry, async loggers) have nothing to do here


def _adopt_environment(env: Mapping[str, str]) -> None:
    """The driver's environment variables, for a writer forked from a server that another
    run started (credentials, proxies, MLflow's settings); `http_limits`' own are kept."""
    for name in list(os.environ):
        if name not in env and os.environ[name] != HTTP_LIMITS.get(name):
            del os.environ[name]
    os.environ.update(env)


class _Child(_Calls):
    """The loop of the writer process: the driver's calls, run on the mirror observer."""

    def __init__(
        self, send: Callable[[tuple[Any, ...]], None], inbox: queue.SimpleQueue, imported: float
    ):
        super().__init__()
        self.send = send
        self.inbox = inbox
        self.imported = imported  # when MLflow was imported (time.monotonic)
        self.mirror: Any = None
        self.later: list[Callable[[], None]] = []

    def loop(self) -> None:
        while True:
            frame = self._next()
            if frame is None:  # the driver is gone: end what it left open, KILLED
                if self.mirror is not None and self.mirror.parent_run_id is not None:
                    self._call(self.mirror._kill, (DriverGone(),))
                return
            message = pickle.loads(frame)
            kind = message[0]
            if kind == "open":
                self._open(*message[1:])
            elif kind == "call" and self.mirror is not None:
                start = time.monotonic()
                self._call(getattr(self.mirror, message[1]), message[2])
                self._timed(message[1], start)
            elif kind == "close":
                self._timed(
                    f"the run ({time.process_time():.2f} s of CPU in all)", time.monotonic()
                )
                self.send(("done", self._results(), self.failures))
                return

    def _timed(self, what: str, start: float) -> None:
        """A debug line: how long a call took, and when it ended (after MLflow's import)."""
        if log.isEnabledFor(logging.DEBUG):
            now = time.monotonic()
            log.debug(
                "pipekit tracking writer: %s took %.0f ms, done %.2f s after MLflow's import",
                what,
                (now - start) * 1000,
                now - self.imported,
            )

    def _next(self) -> bytes | None:
        """The next frame; while none is waiting, work that makes later calls faster."""
        while self.later:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                step = self.later.pop(0)
                with suppress(Exception):
                    step()
        return self.inbox.get()

    def _open(self, cls: type, state: dict[str, Any], context: Mapping[str, Any]) -> None:
        with suppress(OSError):
            os.chdir(context["cwd"])
        sys.path[:] = [p for p in context["path"] if p] + [p for p in sys.path if p]
        _adopt_environment(context["env"])
        for name, level in context["levels"].items():
            logging.getLogger(name or None).setLevel(level)
        mirror = cls.__new__(cls)
        mirror.__dict__.update(state)
        mirror._writer, mirror._client = None, None
        self.mirror, self.uri = mirror, mirror.uri
        start = time.monotonic()
        log.debug(
            "pipekit tracking writer: MLflow imported %.2f s before the run", start - self.imported
        )
        self._call(self._open_store, ())
        self._timed("opening the store", start)
        if self.failures:  # as in a thread: the run's first call fails, the rest do nothing
            self.gone = self.failures[-1]
        if any(stage.model for stage in mirror._run.spec.stages.values()):
            self.later = [_model_modules, _requirement_maps]

    def _open_store(self) -> None:
        from .client import client_for

        mirror = self.mirror
        client = client_for(mirror.uri, sqlite_wal=mirror.sqlite_wal)
        mirror._client = _Reporting(client, self.send)
        db = sqlite_file(mirror.uri)
        if db is not None and db.is_absolute() and mirror.sqlite_wal:
            forkserver.remember(mirror.uri)  # for the server to open ahead of the next run

    def _results(self) -> dict[str, Any]:
        """The mirror's public state (results and settings), what pickles of it."""
        out: dict[str, Any] = {}
        if self.mirror is None:
            return out
        for key, value in vars(self.mirror).items():
            if not key.startswith("_") and _pickles(value):
                out[key] = value
        return out


def _import(modules: Sequence[str]) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # the call that needs it imports again and reports it
            log.debug("pipekit tracking: early import of %s failed: %s", module, exc)
            return


def _model_modules() -> None:
    _import(("mlflow.pyfunc", "mlflow.sklearn", "mlflow.models.signature"))


def _requirement_maps() -> None:
    """The installed distributions, which pinning a model's requirements reads (slow)."""
    from .flavors import _distributions

    _distributions()

"""The worker pools a run owns, so that an interrupt leaves nothing running.

Dask's own pools cannot be stopped from outside: its thread pool joins every thread at
interpreter exit (a hung stage then hangs the process), and its process pool's workers
outlive the driver. Here, per run:

- threads: daemon threads. After an interrupt a stage that does not return is abandoned:
  the driver stops waiting and the process can exit.
- processes: a `ProcessPoolExecutor` whose workers ignore Ctrl-C (the driver stops them),
  are terminated (SIGTERM, then SIGKILL) when the run is interrupted, and exit by
  themselves when the driver dies, even by `kill -9` (a watchdog thread, and on Linux
  the kernel's parent-death signal). A worker whose stage timed out (its hung thread
  abandoned) retires after that task: it sends the result, exits, and the pool starts a
  fresh worker, as the standard library does for `max_tasks_per_child`. Workers are
  forks of a fork server that imported pipekit's and Dask's worker side once per driver
  process (`start_method`): ~10 ms per worker instead of ~0.5 s for a new interpreter
  importing Dask, per worker and run.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import Any

#: how often a worker process checks that its driver is still there (seconds)
WATCH_INTERVAL = 0.5
#: how long terminated worker processes get to exit before SIGKILL (seconds)
TERMINATE_GRACE = 2.0


class DaemonThreadPool(Executor):
    """A minimal thread pool of daemon threads, started on demand up to `max_workers`.

    Like Dask's pool, each task runs in a copy of the submitter's context (contextvars).
    """

    def __init__(self, max_workers: int, name: str = "pipekit-stage"):
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers  # read by dask.local.get_async
        self._name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a pool that was shut down")
            future: Future = Future()
            self._work.put((future, contextvars.copy_context(), fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._worker, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return future

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, context, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = context.run(fn, *args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, context, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once their current task ends; `wait=False` abandons them."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()


#: What every worker process imports before its first task: loaded once, into the fork
#: server, so that a worker starts as a fork of an interpreter that has them (~10 ms)
#: instead of a new interpreter importing Dask (~0.5 s each, per run). Never user code:
#: the fork server lives as long as the driver, and a notebook user edits their modules.
WORKER_MODULES = (
    "pipekit.run.pools",
    "pipekit.run.compile",
    "pipekit.run.fanin",
    "dask.local",
    "dask.multiprocessing",
    "cloudpickle",
    "ctypes",  # `_die_with_parent`
    "multiprocessing.synchronize",  # the pool's queues
)


def process_pool(max_workers: int) -> Any:
    """A process pool like Dask's whose workers watch the driver and can retire
    (`retire_worker`), started by `start_method()`."""
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("PYTHONHASHSEED") in (None, "0"):  # as dask does: one hash seed for all
        os.environ["PYTHONHASHSEED"] = "6640"

    class RetiringProcessPool(ProcessPoolExecutor):
        def _spawn_process(self) -> None:  # CPython 3.11-3.13's hook; our worker loop
            process = self._mp_context.Process(
                target=_retiring_worker,
                args=(self._call_queue, self._result_queue, self._initializer, self._initargs),
            )
            process.start()
            self._processes[process.pid] = process

    return RetiringProcessPool(
        max_workers,
        mp_context=start_method(),
        initializer=worker_started,
        initargs=(os.getpid(), dict(os.environ)),
    )


def start_method() -> Any:
    """The multiprocessing context of worker processes: Dask's `multiprocessing.context`
    when the user set one; else `forkserver` where the platform has it (each worker a fork
    of a clean server process that preloaded `WORKER_MODULES`: as safe as Dask's default
    `spawn`, which would start and import a whole interpreter per worker and run); else
    `spawn`."""
    import multiprocessing

    import dask

    if dask.config.get("multiprocessing.context", None) is not None:
        from dask.multiprocessing import get_context

        return get_context()
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    from multiprocessing import forkserver

    # the list is the process's (the standard library's default is ["__main__"]); it takes
    # effect when the server starts, so a server someone else started keeps its own list
    server = getattr(forkserver, "_forkserver", None)
    preload = list(getattr(server, "_preload_modules", None) or ["__main__"])
    missing = [name for name in WORKER_MODULES if name not in preload]
    if missing:
        context.set_forkserver_preload([*preload, *missing])
    return context


#: set in a worker process whose stage thread was abandoned (a timeout): it retires
_retiring = threading.Event()


def retire_worker() -> None:
    """Ask this worker process to exit after its current task (a no-op in the driver)."""
    _retiring.set()


def _retiring_worker(call_queue: Any, result_queue: Any, initializer: Any, initargs: Any) -> None:
    """The standard library's worker loop (`concurrent.futures.process._process_worker`),
    plus retiring: after a task that called `retire_worker`, send its result marked as the
    worker's last (`exit_pid`, which makes the pool start a replacement) and exit at once,
    without waiting for the abandoned thread."""
    from concurrent.futures.process import _ExceptionWithTraceback, _sendback_result

    try:
        initializer(*initargs)
    except BaseException:  # as the standard library: the pool notices the exit, is broken
        return
    _retiring.clear()  # only a worker's own tasks decide (a forked copy starts clean)
    while True:
        call_item = call_queue.get(block=True)
        if call_item is None:
            result_queue.put(os.getpid())
            return
        try:
            result = call_item.fn(*call_item.args, **call_item.kwargs)
        except BaseException as exc:
            error = _ExceptionWithTraceback(exc, exc.__traceback__)
            exit_pid = os.getpid() if _retiring.is_set() else None
            _sendback_result(result_queue, call_item.work_id, exception=error, exit_pid=exit_pid)
        else:
            exit_pid = os.getpid() if _retiring.is_set() else None
            _sendback_result(result_queue, call_item.work_id, result=result, exit_pid=exit_pid)
            del result
        del call_item
        if _retiring.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # the abandoned stage thread must not keep us (it may hold the GIL)


def worker_started(driver: int, environ: dict[str, str] | None = None) -> None:
    """Initializer of every worker process.

    Ctrl-C reaches the whole process group; the driver decides and terminates us, so a
    worker only notes it (no traceback from idle workers). The worker ends itself when
    the driver is gone. Under `forkserver` the driver is not our parent (the fork server
    is, and it outlives the driver while workers hold its liveness pipe), so the watchdog
    watches the driver itself. `environ` is the driver's environment as the pool started
    (a fork server keeps the one it started with), as a spawned worker would have it.
    """
    signal.signal(signal.SIGINT, _ignore)
    _die_with_parent()
    parent = os.getppid()
    handle = _process_handle(driver)
    if parent != driver and not _alive(driver, handle):  # the driver died before we got here
        os._exit(1)
    if environ is not None and environ != os.environ:
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        os.environ.update(environ)
    watchdog = threading.Thread(
        target=_watch_driver, args=(driver, parent, handle), name="pipekit-watchdog", daemon=True
    )
    watchdog.start()
    numpy = sys.modules.get("numpy")  # as dask's initializer: no random state shared
    if numpy is not None:
        numpy.random.seed()


def _ignore(signum: int, frame: Any) -> None:
    """A no-op handler (not SIG_IGN, which processes the stage starts would inherit)."""


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the driver dies, even if a stage holds the GIL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog thread still covers it


def _watch_driver(driver: int, parent: int, handle: int | None) -> None:
    """Exit when the driver has ended: at once with a pidfd (Linux), else by polling."""
    if handle is not None:
        import select

        poller = select.poll()
        poller.register(handle, select.POLLIN)  # readable once the process has ended
        while not poller.poll():
            pass
        os._exit(1)
    while os.getppid() == parent and (parent == driver or _alive(driver)):
        time.sleep(WATCH_INTERVAL)
    os._exit(1)


def _process_handle(pid: int) -> int | None:
    """A pidfd of `pid` (Linux 5.3+), which cannot name another process after a pid is
    reused, and which polls readable once the process ends, even before it is reaped."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or already gone
        return None


def _alive(pid: int, handle: int | None = None) -> bool:
    if handle is not None:
        import select

        poller = select.poll()
        poller.register(handle, select.POLLIN)
        return not poller.poll(0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def terminate(pool: Any, grace: float = TERMINATE_GRACE) -> None:
    """Stop a process pool's workers now: SIGTERM, `grace` seconds, then SIGKILL."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    _signal_all(processes, "terminate")
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    left = [p for p in processes if p.is_alive()]
    _signal_all(left, "kill")
    for process in left:
        process.join(1.0)
    pool.shutdown(wait=False, cancel_futures=True)


def _signal_all(processes: Iterable[Any], how: str) -> None:
    for process in processes:
        with contextlib.suppress(OSError, ValueError):  # already gone, or closed
            getattr(process, how)()

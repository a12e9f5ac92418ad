"""`executor=distributed`: the compiled graph computed on a Dask cluster.

The graph is the same low-level dict the local schedulers get; `Client.get` hands it to
the cluster's scheduler, and intermediate outputs move from worker to worker. With
`executor.address` unset, a `LocalCluster` of worker processes is started on 127.0.0.1
for the run and closed afterwards; with `executor.address=tcp://host:8786` an existing
scheduler is used (and left running).

**Where stage events come from.** Dask's local scheduler callbacks (`callbacks=`) do not
fire on distributed, and a scheduler plugin would have to be installed on a scheduler
pipekit may not own (and importable there). So the events are reported from the
places that see them:

- `running`: the stage's task, wrapped in `Announce`, sends one `log_event` message from
  the worker as it starts (workers import pipekit anyway: the tasks are pipekit objects);
  the client subscribes to the run's topic.
- the final event: each stage's future, when the client learns it finished (a done
  callback), with its output gathered in batches (one round trip for all futures that
  finished together).
- the attempts of a stage that passed after retries (`attempt 2/3`, the errors of the
  failed attempts): a stage with `retries` runs as a task returning `(output, attempt
  log)`, which the client gathers; its dependents read the output through a `getitem`
  task. The log is in the worker's memory (`compile.ATTEMPTS`), so it must travel with
  the result; stages without retries keep one task.

Messages and results land in one queue that the calling (main) thread drains, and it
reports them to `execute.StageTimer` (`begin`/`end`): `run/execute.py` stays the only
emitter and observers are called from one thread, in order, as with the local
schedulers. A result that arrives before its `running` message gets a `running` event
first. Durations are measured in the client between the two, so they include a few
milliseconds of messaging.

MLflow is written by the client process only (tracking's writer thread): workers need no
tracking credentials, and runs of parallel stages cannot log into each other.

**Faults.** A stage that raises returns `Failed` inside its task, so `retries` (and the
other per-stage settings) behave as on the local schedulers. A worker that dies
mid-stage (killed, OOM) is Dask's to handle: the scheduler re-runs the task on another
worker, up to `distributed.scheduler.allowed-failures` times (3 by default), then the
stage fails with `KilledWorker`; stages downstream of it are skipped.

Stage `resources: {GPU: 1}` become Dask worker resources of that stage's task; a stage
that needs a resource no worker offers is refused before anything runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import ClusterError, where
from .compile import Failed, Skipped, StageTask, attempt_log

#: How long to wait for a scheduler at `executor.address` to answer (seconds).
CONNECT_TIMEOUT = 10.0
#: How long to collect finished stages before fetching their outputs in one gather (s).
GATHER_WINDOW = 0.05


class Announce:
    """Wraps a stage task on the cluster: tells the client the stage started, then runs it.

    With `report`, returns `(output, attempt log or None)`: the log a stage that passed
    after retries left in this worker's memory, for the client's events."""

    __slots__ = ("key", "report", "task", "topic")

    def __init__(self, task: Any, key: str, topic: str, report: bool = False):
        self.task, self.key, self.topic, self.report = task, key, topic, report

    def __reduce__(self):
        return (Announce, (self.task, self.key, self.topic, self.report))

    def __call__(self, *upstream: Any) -> Any:
        if not any(isinstance(value, Failed | Skipped) for value in upstream):
            try:
                from distributed import get_worker

                get_worker().log_event(self.topic, self.key)
            except Exception:  # no worker (a local fallback): the result still counts
                pass
        output = self.task(*upstream)
        if not self.report:
            return output
        return output, attempt_log(self.task, self.key)


def _retries(task: Any) -> bool:
    """Whether the stage task inside `task` (StoreTask, ...) may make several attempts."""
    for _ in range(8):  # wrappers keep the stage task as `.task`
        if isinstance(task, StageTask):
            return task.retries > 0
        task = getattr(task, "task", None)
    return False


#: The cluster of the run in progress (`session`): (client, dashboard link).
_ACTIVE: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "pipekit_cluster", default=None
)


@contextlib.contextmanager
def session(spec: Any, keys: Sequence[str]) -> Iterator[None]:
    """The cluster for one whole run, opened before any observer hears of the run: an
    unreachable scheduler or a resource no worker offers stops it before it starts, and
    every compute phase of the run uses the same cluster."""
    options = spec.section("executor")
    with cluster_client(options, spec.name) as (client, link):
        _check_resources(client, _resources(spec, keys), spec.name)
        token = _ACTIVE.set((client, link))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def compute_on_cluster(
    dsk: dict[str, Any],
    keys: Sequence[str],
    *,
    spec: Any = None,
    timer: Any = None,
) -> dict[str, Any]:
    """Compute `keys` of `dsk` on the run's cluster (`session`), or else on the cluster the
    `executor` section of `spec` names, opened for this call.

    `timer` is the run's `execute.StageTimer` (its `begin`/`end` emit the stage events);
    `spec` a `PipelineSpec` (its executor section and stage resources), or None.
    """
    needs = _resources(spec, keys)
    active = _ACTIVE.get()
    if active is not None:
        _check_resources(active[0], needs, spec.name if spec is not None else None)
        return _run(active[0], dsk, list(keys), needs, timer, active[1])
    options = spec.section("executor") if spec is not None else {}
    pipeline = spec.name if spec is not None else None
    with cluster_client(options, pipeline) as (client, link):
        _check_resources(client, needs, pipeline)
        return _run(client, dsk, list(keys), needs, timer, link)


@contextlib.contextmanager
def cluster_client(
    options: Mapping[str, Any], pipeline: str | None = None
) -> Iterator[tuple[Any, str]]:
    """A `distributed.Client` for the run and the dashboard link (or ""); a local cluster
    started here is closed on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ClusterError(
            f"{where(pipeline, key='executor.scheduler')} 'distributed' needs the "
            f"'distributed' package: pip install 'pipekit[distributed]'"
        ) from exc
    address = options.get("address")
    cluster = None
    if address:
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"{where(pipeline, key='executor.address')} no Dask scheduler answers at "
                f"{address} ({type(exc).__name__}: {exc}); start one (`dask scheduler`) or "
                f"leave executor.address unset for a local cluster"
            ) from exc
    else:
        workers = options.get("n_workers") or options.get("num_workers")
        with _quiet_distributed():
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=options.get("threads_per_worker") or 1,
                memory_limit=options.get("memory_limit") or "auto",
                resources=dict(options.get("resources") or {}) or None,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",  # the HTTP server starts anyway: no fixed port
                silence_logs=logging.ERROR,
            )
            client = Client(cluster, set_as_default=False)
    try:
        link = _dashboard(client, cluster is not None, options)
        yield client, link
    finally:  # one client per run (~20 ms): a kept one would log reconnects forever
        if cluster is None:  # once its scheduler is gone
            _close_later(client)
        else:
            with _quiet_distributed():
                client.close()
                cluster.close()


def _close_later(client: Any) -> None:
    """Close the client of a scheduler we do not own without making the run wait: its
    outputs are in and its futures released, and the close waits a round trip for the
    scheduler (20-40 ms, 10% of a 0.25 s run). Not a daemon thread: an ending
    interpreter waits for it, so the scheduler sees the client leave, not vanish."""
    import threading

    def close() -> None:
        with contextlib.suppress(Exception):
            client.close()

    threading.Thread(target=close, name="pipekit-client-close").start()


def _dashboard(client: Any, local: bool, options: Mapping[str, Any]) -> str:
    """Print where to watch the cluster (stderr) and return the link."""
    if not options.get("dashboard", True):
        return ""
    try:
        link = client.dashboard_link or ""
    except Exception:
        link = ""
    if not link:
        return ""
    try:
        import bokeh  # noqa: F401  (the dashboard's pages need it)
    except ImportError:
        base = link.rsplit("/", 1)[0]
        link = f"{base}/info/main/workers.html"
        note = " (the live dashboard needs `pip install bokeh`)"
    else:
        note = ""
    kind = "local cluster" if local else "cluster"
    sys.stderr.write(f"pipekit: Dask {kind}: {link}{note}\n")
    sys.stderr.flush()
    return link


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """distributed logs cluster start and stop chatter at INFO/WARNING: not for the user."""
    names = ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _resources(spec: Any, keys: Sequence[str]) -> dict[str, dict[str, float]]:
    if spec is None:
        return {}
    stages = spec.stages
    found = {}
    for key in keys:
        stage = stages.get(key)
        if stage is not None and stage.resources:
            found[key] = dict(stage.resources)
    return found


def _check_resources(
    client: Any, needs: Mapping[str, Mapping[str, float]], pipeline: str | None
) -> None:
    """Refuse a stage no worker can run (its task would wait forever)."""
    if not needs:
        return
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    offered = [dict(w.get("resources") or {}) for w in workers.values()]
    for stage, wanted in needs.items():
        if not any(all(have.get(r, 0) >= n for r, n in wanted.items()) for have in offered):
            shown = ", ".join(f"{r}: {n:g}" for r, n in wanted.items())
            raise ClusterError(
                f"{where(pipeline, stage, 'resources')} {{{shown}}}: no worker of the cluster "
                f"offers that ({len(offered)} workers); start workers with "
                f'`dask worker --resources "{next(iter(wanted))}=1"`, or give the local '
                f"cluster `executor.resources={{{shown}}}`"
            )


def _run(
    client: Any,
    dsk: dict[str, Any],
    keys: list[str],
    needs: Mapping[str, Mapping[str, float]],
    timer: Any,
    link: str,
) -> dict[str, Any]:
    """Submit the graph, report stage events as they come, return every key's output.

    On the cluster every key carries this run's tag (`train@1f2e...`): a scheduler shared
    by several runs or users must never take one run's `train` for another's (Dask keeps
    the first task of a key it still holds). A stage with retries computes `train@...#run`
    (its output and attempt log, which the client fetches); `train@...` picks the output.
    """
    import operator
    from collections import defaultdict

    tag = uuid.uuid4().hex[:12]
    topic = f"pipekit-{tag}"
    ours = {key: f"{key}@{tag}" for key in dsk}
    announced = set(keys)
    fetch: dict[str, str] = {}  # stage -> the key its output and attempt log are read from
    graph: dict[str, Any] = {}
    for key, task in dsk.items():
        if isinstance(task, tuple) and task and callable(task[0]):
            args = tuple(ours.get(a, a) if isinstance(a, str) else a for a in task[1:])
            if key in announced and _retries(task[0]):
                fetch[key] = reported = f"{ours[key]}#run"
                graph[reported] = (Announce(task[0], key, topic, report=True), *args)
                graph[ours[key]] = (operator.getitem, reported, 0)
                continue
            head = Announce(task[0], key, topic) if key in announced else task[0]
            graph[ours[key]] = (head, *args)
        else:
            graph[ours[key]] = task
    stage_of = {fetch.get(key, ours[key]): key for key in keys}
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    client.subscribe_topic(topic, lambda event: inbox.put(("running", event[1])))
    # called by the scheduler per task key ({} for tasks without resources); a bound method
    # of a plain dict pickles without pipekit, which the scheduler may not have
    wanted = {fetch.get(k, ours[k]): dict(v) for k, v in needs.items()}
    resources = defaultdict(dict, wanted).__getitem__ if needs else None
    wanted_keys = [fetch.get(k, ours[k]) for k in keys]
    futures = client.get(graph, wanted_keys, sync=False, resources=resources)
    by_key = {stage_of[f.key]: f for f in futures}
    for future in futures:
        future.add_done_callback(lambda f: inbox.put(("done", f)))
    meta = {"dashboard": link} if link else None
    begun: set[str] = set()
    outputs: dict[str, Any] = {}
    try:
        while len(outputs) < len(keys):
            items = _batch(inbox, len(keys) - len(outputs))
            done = []
            for kind, item in items:
                if kind == "running":
                    if item in by_key and item not in begun and item not in outputs:
                        begun.add(item)
                        if timer is not None:
                            timer.begin(item, meta)
                elif stage_of[item.key] not in outputs:
                    done.append(item)
            finished = [f for f in done if f.status == "finished"]
            values = client.gather(finished, errors="skip") if finished else []
            results = dict(zip([f.key for f in finished], values, strict=True))
            for future in done:
                key = stage_of[future.key]
                log = None
                if future.key in results:
                    output = results[future.key]
                    if key in fetch:  # (output, the attempt log of a stage that retried)
                        output, log = output
                else:
                    output = _lost(key, future, dsk, by_key, outputs)
                if key not in begun and not isinstance(output, Skipped):
                    begun.add(key)  # the result overtook the worker's message
                    if timer is not None:
                        timer.begin(key, meta)
                outputs[key] = output
                if timer is not None:
                    timer.end(key, output, log)
    except BaseException:
        with contextlib.suppress(Exception):
            client.cancel(futures)
        raise
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)
        for future in futures:  # the cluster may drop this run's data now
            future.release()
    return {key: outputs[key] for key in keys}


def _batch(inbox: queue.SimpleQueue, pending: int) -> list[tuple[str, Any]]:
    """The next messages, in order. Once a result is in, more are awaited for up to
    GATHER_WINDOW seconds, so that one gather fetches many outputs (each gather is a round
    trip to the cluster)."""
    items = [_next(inbox)]
    deadline = None
    while True:
        try:
            items.append(inbox.get_nowait())
            continue
        except queue.Empty:
            pass
        results = sum(kind == "done" for kind, _ in items)
        if not results or results >= pending:
            return items
        now = time.monotonic()
        if deadline is None:
            deadline = now + GATHER_WINDOW
        if now >= deadline:
            return items
        try:
            items.append(inbox.get(timeout=deadline - now))
        except queue.Empty:
            return items


def _next(inbox: queue.SimpleQueue) -> tuple[str, Any]:
    """The next message; waits in short slices so Ctrl-C stays responsive."""
    while True:
        try:
            return inbox.get(timeout=0.5)
        except queue.Empty:
            continue


def _lost(
    key: str,
    future: Any,
    graph: Mapping[str, Any],
    by_key: Mapping[str, Any],
    outputs: Mapping[str, Any],
) -> Failed | Skipped:
    """The outcome of a stage whose task erred on the cluster (not inside the stage: e.g.
    its worker died too often, or its code cannot be unpickled there)."""
    task = graph.get(key)
    deps = [a for a in task[1:] if isinstance(a, str) and a in graph] if task else []
    for dep in deps:
        seen = outputs.get(dep)
        if isinstance(seen, Failed):
            return Skipped(key, seen.stage)
        if isinstance(seen, Skipped):
            return Skipped(key, seen.because)
        other = by_key.get(dep)
        if other is not None and other.status in ("error", "cancelled"):
            return Skipped(key, dep)
    try:
        error = future.exception(timeout=CONNECT_TIMEOUT)
        tb = future.traceback(timeout=CONNECT_TIMEOUT)
    except Exception as exc:  # cancelled, or the client lost the scheduler
        error, tb = exc, None
    if error is None:
        error = RuntimeError(f"the task of stage '{key}' was {future.status} on the cluster")
    import traceback

    text = "".join(traceback.format_exception(type(error), error, tb)) if tb else str(error)
    if isinstance(error, ModuleNotFoundError | AttributeError | ImportError):
        error = type(error)(
            f"{error} (on a cluster worker: stage code must be importable there, see "
            f"docs/scaling.md)"
        )
    return Failed(key, error, text, 1)

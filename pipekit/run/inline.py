"""`executor=sync`: the compiled graph run in topological order, in the calling thread.

Dask's synchronous scheduler (`dask.local.get_sync`) is its parallel machinery with a
pool of one: it converts every task to a `Task` object (twice), orders the whole graph
(`dask.order`), builds its dependency sets, and passes each task through a future and a
queue. Measured on a 2-core machine: 75-120 µs per task, 11-16 s for a 100,000-member
matrix, before a stage runs. A graph that `compile.build_graph` made needs none of it:
each task is `(callable, *upstream keys)` and the stages arrive in topological order.
`get` runs such a graph in that order at a few µs per task, with Dask's callback
protocol (`start`, `start_state`, `pretask`, `posttask`, `finish`, as `get_sync` calls
them), so `execute.StageTimer` and Dask's diagnostics see the same run. Any other graph
(literal arguments, nested tasks, keys out of order) goes to `get_sync` unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any


def get(
    dsk: Mapping[Hashable, Any], keys: Sequence[Hashable], callbacks: Any = None, **kwargs: Any
) -> tuple[Any, ...]:
    """Compute `keys` of `dsk` as `dask.local.get_sync` does (a tuple of their outputs)."""
    planned = plan(dsk, keys)
    if planned is None or kwargs.get("cache") is not None:
        from dask.local import get_sync

        return get_sync(dsk, list(keys), callbacks=callbacks, **kwargs)
    from dask.callbacks import local_callbacks, unpack_callbacks

    order, dependencies = planned
    wanted = set(keys)
    cache: dict[Hashable, Any] = {}
    # intermediate outputs nobody asked for are dropped once their last dependent ran
    readers: dict[Hashable, int] = {}
    for deps in dependencies.values():
        for dep in deps:
            if dep not in wanted:
                readers[dep] = readers.get(dep, 0) + 1
    # the keys Dask's diagnostics read (`ProgressBar` counts waiting/ready/running/finished)
    state: dict[str, Any] = {
        "cache": cache,
        "dependencies": dependencies,
        "waiting": dict.fromkeys(order),  # not started yet, in the order they will run
        "ready": [],
        "running": set(),
        "finished": set(),
        "released": set(),
    }
    waiting, running, finished = state["waiting"], state["running"], state["finished"]
    with local_callbacks(callbacks) as active:
        _, _, pretask, posttask, _ = unpack_callbacks(active)
        started = []
        succeeded = False
        try:
            for callback in active:
                if callback[0]:
                    callback[0](dsk)
                started.append(callback)
            for callback in active:
                if callback[1]:
                    callback[1](dsk, state)
            for key in order:
                del waiting[key]
                running.add(key)
                for hook in pretask:
                    hook(key, dsk, state)
                deps = dependencies.get(key)
                if deps is None:
                    result = dsk[key][0]()
                else:
                    result = dsk[key][0](*[cache[dep] for dep in deps])
                    for dep in deps:
                        if dep in readers:
                            readers[dep] -= 1
                            if not readers[dep]:
                                del readers[dep], cache[dep]
                                state["released"].add(dep)
                cache[key] = result
                running.discard(key)
                finished.add(key)
                for hook in posttask:
                    hook(key, result, dsk, state, None)
            succeeded = True
        finally:
            for callback in started:
                if callback[4]:
                    callback[4](dsk, state, not succeeded)
    return tuple(cache[key] for key in keys)


def plan(
    dsk: Mapping[Hashable, Any], keys: Sequence[Hashable]
) -> tuple[list[Hashable], dict[Hashable, tuple]] | None:
    """The keys to run, in order, and the upstream keys of those that have any, when `dsk`
    is a pipekit graph: every task a tuple `(callable, *keys of earlier tasks)`; None for
    any other graph (or an unknown key)."""
    seen: set[Hashable] = set()
    dependencies: dict[Hashable, tuple] = {}
    for key, task in dsk.items():
        if type(task) is not tuple or not task or not callable(task[0]):
            return None
        if len(task) > 1:
            deps = task[1:]
            for dep in deps:
                if type(dep) is not str or dep not in seen:
                    return None
            dependencies[key] = deps
        seen.add(key)
    if len(keys) == len(seen) and all(key in seen for key in keys):
        return list(dsk), dependencies
    needed = set()
    for key in keys:
        if key not in seen:
            return None
        needed.add(key)
    for key in reversed(list(dsk)):  # topological order: one backward pass finds ancestors
        if key in needed:
            needed.update(dependencies.get(key, ()))
    return [key for key in dsk if key in needed], {
        key: deps for key, deps in dependencies.items() if key in needed
    }

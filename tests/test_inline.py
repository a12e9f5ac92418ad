"""executor=sync runs the compiled graph in order in the calling thread (run/inline.py):
the same outputs and the same Dask callback protocol as `dask.local.get_sync`."""

from __future__ import annotations

import threading

import pytest
from conftest import make
from dask.callbacks import Callback
from dask.local import get_sync

from pipekit.run import inline


def add(*values: int) -> int:
    return sum(values) + 1


def diamond() -> dict:
    return {
        "a": (add,),
        "b": (add, "a"),
        "c": (add, "a"),
        "d": (add, "b", "c"),
        "side": (add,),
    }


def test_outputs_match_get_sync_and_only_needed_tasks_run():
    ran: list[str] = []

    def hook(key, dsk, state):
        ran.append(key)

    dsk = diamond()
    assert inline.get(dsk, ["d", "b"]) == tuple(get_sync(dsk, ["d", "b"]))
    inline.get(dsk, ["b"], callbacks=[(None, None, hook, None, None)])
    assert ran == ["a", "b"]  # `c`, `d` and `side` are not needed for `b`


def test_callbacks_fire_in_order_with_the_state_dask_gives_them():
    seen: list[tuple] = []

    def start(dsk):
        seen.append(("start",))

    def pretask(key, dsk, state):
        upstream = [state["cache"][dep] for dep in state["dependencies"].get(key, ())]
        seen.append(("pre", key, upstream, key in state["running"]))

    def posttask(key, result, dsk, state, worker_id):
        seen.append(("post", key, result, key in state["finished"]))

    def finish(dsk, state, failed):
        seen.append(("finish", failed, len(state["finished"]), len(state["waiting"])))

    inline.get(diamond(), ["d"], callbacks=[(start, None, pretask, posttask, finish)])
    assert seen[0] == ("start",)
    assert ("pre", "d", [2, 2], True) in seen and ("post", "d", 5, True) in seen
    keys = [entry[1] for entry in seen if entry[0] == "pre"]
    assert keys.index("a") < keys.index("b") < keys.index("d")
    assert keys.index("c") < keys.index("d") and "side" not in keys
    assert seen[-1] == ("finish", False, 4, 0)


def test_an_interrupt_in_a_task_reaches_the_caller_and_finish_hears_of_it():
    def stop() -> None:
        raise KeyboardInterrupt

    finished: list[bool] = []
    dsk = {"a": (add,), "b": (stop,), "c": (add, "a", "b")}
    with pytest.raises(KeyboardInterrupt):
        inline.get(
            dsk, ["c"], callbacks=[(None, None, None, None, lambda d, s, f: finished.append(f))]
        )
    assert finished == [True]


def test_unread_intermediate_outputs_are_released_and_asked_ones_kept():
    released: list[set] = []
    dsk = diamond()

    def finish(dsk, state, failed):
        released.append(set(state["released"]))

    out = inline.get(dsk, ["d"], callbacks=[(None, None, None, None, finish)])
    assert out == (5,)
    assert released == [{"a", "b", "c"}]


@pytest.mark.parametrize(
    "dsk",
    [
        {"x": (add, 1, 2), "y": (add, "x")},  # literal arguments
        {"y": (add, "x"), "x": (add,)},  # keys out of topological order
        {"x": 5, "y": (add, "x")},  # a literal value as a task
        {"x": (add,), "y": (add, (add, "x"))},  # a nested task
    ],
    ids=["literal-args", "out-of-order", "literal-task", "nested-task"],
)
def test_other_graphs_go_to_get_sync_unchanged(dsk):
    assert inline.plan(dsk, ["y"]) is None
    assert inline.get(dsk, ["y"]) == tuple(get_sync(dsk, ["y"]))


def test_active_dask_callbacks_see_a_pipekit_run_when_none_are_passed():
    seen: list[str] = []

    class Keys(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            seen.append(key)

    with Keys():
        assert inline.get(diamond(), ["d"]) == (5,)
    assert sorted(seen) == ["a", "b", "c", "d"]


def test_a_sync_pipeline_run_happens_in_the_calling_thread(tmp_path):
    p = make(
        {
            "first": {"_target_": "test_inline.thread_name"},
            "second": {"_target_": "test_inline.echo", "inputs": {"value": "first"}},
        },
        executor={"scheduler": "sync"},
    )
    result = p.run(progress=False)
    assert result["second"] == threading.current_thread().name
    assert result.status == {"first": "done", "second": "done"}


def thread_name() -> str:
    return threading.current_thread().name


def echo(value: str) -> str:
    return value

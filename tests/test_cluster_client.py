"""The client of a run on an existing scheduler (`executor.address`) is closed after the
run, in the background (run/distributed.py `_close_later`): it still leaves the
scheduler, and nothing of it stays behind."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import local_cluster, make


@pytest.fixture(scope="module")
def cluster(request):
    return local_cluster(request, workers=1)


def clients(cluster) -> set[str]:
    return {name for name in cluster.scheduler.clients if name != "fire-and-forget"}


def closing() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pipekit-client-close"]


def settle(cluster, before: set[str], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds  # bounded: a wait, not a timing claim
    while (clients(cluster) != before or closing()) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_each_run_leaves_the_scheduler_once_done(cluster):
    before = clients(cluster)
    p = make(
        {
            "a": {"_target_": "const", "params": {"value": 2}},
            "b": {"_target_": "add", "inputs": {"a": "a"}, "params": {"b": 3}},
        },
        executor={"scheduler": "distributed", "address": cluster.scheduler_address},
    )
    for _ in range(3):  # a run may start while the previous run's client still closes
        assert p.run(progress=False, force=True)["b"] == 5
    settle(cluster, before)
    assert clients(cluster) == before
    assert not closing()

"""executor=distributed on a real LocalCluster of 2 worker processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import local_cluster, make

import pipekit as pk
from pipekit.core.events import Observer
from pipekit.errors import ClusterError


@pytest.fixture(scope="module")
def cluster(request):
    """Two worker processes, one thread each; closed after the module."""
    return local_cluster(request, workers=2)


def on(cluster, **extra):
    return {"scheduler": "distributed", "address": cluster.scheduler_address, **extra}


class Recorder(Observer):
    wants_outputs = False

    def __init__(self):
        self.events = []

    def stage_changed(self, event):
        self.events.append((event.stage, event.state))


def test_the_cancer_example_matches_the_threaded_run_and_is_tracked(cluster, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["cache=off", "tracking=local", f"tracking.uri={uri}"]
    threaded = pk.load("cancer", overrides=["cache=off", "tracking=off", "executor=threads"]).run(
        progress=False
    )
    recorder = Recorder()
    p = pk.load(
        "cancer",
        overrides=[
            *common,
            "executor=distributed",
            f"executor.address={cluster.scheduler_address}",
        ],
    )
    result = p.run(progress=False, observers=[recorder])
    assert result.ok, result.errors
    assert result["evaluate"] == threaded["evaluate"]
    assert result["publish"] == threaded["publish"]
    for stage in p.stages:  # events came from the cluster, in order, once each
        states = [s for name, s in recorder.events if name == stage]
        assert states == ["pending", "running", "done"], (stage, states)
    client = MlflowClient(uri)
    parent = client.get_run(result.tracking["mlflow_run_id"])
    assert (
        parent.info.status == "FINISHED" and parent.data.tags["pipekit.executor"] == "distributed"
    )
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(p.stages)
    assert all(r.info.status == "FINISHED" for r in children)


def test_stages_run_in_the_worker_processes(cluster):
    p = make(
        {
            "one": {"_target_": "scale_stages.pid"},
            "two": {"_target_": "scale_stages.pid"},
        },
        executor=on(cluster),
    )
    result = p.run(progress=False)
    workers = {w.pid for w in cluster.workers.values() if getattr(w, "pid", None)}
    assert {result["one"], result["two"]} <= workers and os.getpid() not in workers


def test_a_3x2_matrix_with_a_fan_in_runs_on_the_cluster(cluster):
    recorder = Recorder()
    p = make(
        {
            "train": {
                "_target_": "scale_stages.fit",
                "matrix": {"region": ["eu", "us", "apac"], "model": ["logreg", "forest"]},
            },
            "evaluate": {
                "_target_": "scale_stages.score",
                "matrix": {"region": ["eu", "us", "apac"], "model": ["logreg", "forest"]},
                "inputs": {"trained": "train"},
            },
            "compare": {"_target_": "scale_stages.collect", "inputs": {"models": "evaluate[*]"}},
        },
        executor=on(cluster),
    )
    result = p.run(progress=False, observers=[recorder])
    assert result.ok, result.errors
    assert len(result["compare"]["models"]) == 6
    assert result["compare"]["models"]["evaluate[region=us,model=forest]"] == {"accuracy": 0.71}
    done = [name for name, state in recorder.events if state == "done"]
    assert len(done) == 13 and done[-1] == "compare"


def test_a_worker_killed_mid_stage_is_survived_by_daskss_rescheduling(cluster, tmp_path):
    """The scheduler re-runs the task of a worker that died (allowed-failures, 3 by
    default); the nanny starts a new worker. Stage `retries` are not involved."""
    marker = tmp_path / "started"
    killed: list[int] = []

    def kill_when_started() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.05)
        if marker.exists():
            time.sleep(0.2)  # the pid is written
            pid = int(marker.read_text())
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    p = make(
        {
            "before": {"_target_": "core_stages.const", "params": {"value": 1}},
            "victim": {
                "_target_": "scale_stages.die_once",
                "inputs": {"x": "before"},
                "params": {"marker": str(marker), "hold": 60.0},
            },
            "after": {"_target_": "core_stages.add", "inputs": {"a": "before"}},
        },
        executor=on(cluster),
    )
    result = p.run(progress=False, raise_on_failure=False)
    killer.join(timeout=30)
    assert killed, "the stage never started"
    assert result.ok, result.errors
    assert result["victim"]["first"] == killed[0] != result["victim"]["pid"]


def test_stage_retries_behave_as_on_the_local_schedulers(cluster, tmp_path):
    counter = tmp_path / "attempts"
    p = make(
        {
            "flaky": {
                "_target_": "core_stages.flaky",
                "params": {"counter": str(counter)},
                "retries": 1,
            }
        },
        executor=on(cluster),
    )
    assert p.run(progress=False)["flaky"] == 2
    failing = make(
        {
            "bad": {"_target_": "core_stages.boom"},
            "skipped": {"_target_": "core_stages.add", "inputs": {"a": "bad"}},
            "fine": {"_target_": "core_stages.const"},
        },
        executor=on(cluster),
    )
    result = failing.run(progress=False, raise_on_failure=False)
    assert result.status == {"bad": "failed", "skipped": "skipped", "fine": "done"}
    assert "stage 'bad' failed: ValueError: boom" in str(result.errors["bad"])


def test_a_resource_no_worker_offers_is_refused_before_anything_runs(cluster, tmp_path):
    log = tmp_path / "log"
    p = make(
        {
            "first": {"_target_": "scale_stages.counted", "params": {"log": str(log), "name": "x"}},
            "gpu": {"_target_": "core_stages.const", "resources": {"GPU": 1}},
        },
        executor=on(cluster),
    )
    with pytest.raises(ClusterError, match=r"stage 'gpu' resources \{GPU: 1\}: no worker"):
        p.run(progress=False)
    assert not log.exists()
    with pytest.raises(pk.ConfigError, match=r"resources.GPU must be a positive number"):
        make({"s": {"_target_": "core_stages.const", "resources": {"GPU": -1}}})


def test_an_unreachable_scheduler_stops_the_run_before_it_starts(monkeypatch, tmp_path):
    import pipekit.run.distributed as dist

    monkeypatch.setattr(dist, "CONNECT_TIMEOUT", 2.0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    recorder = Recorder()
    p = make(
        {"s": {"_target_": "core_stages.const"}},
        executor={"scheduler": "distributed", "address": "tcp://127.0.0.1:9"},
        tracking={"backend": "local", "uri": uri},
    )
    with pytest.raises(ClusterError, match=r"executor.address no Dask scheduler answers at"):
        p.run(progress=False, observers=[recorder])
    assert recorder.events == []  # not even `pending`: the run never started
    if (tmp_path / "mlflow.db").exists():  # and no MLflow run was opened
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_without_an_address_a_local_cluster_is_started_and_closed(capsys):
    import psutil

    def workers() -> set[int]:
        """Live worker processes (multiprocessing's resource tracker stays: not a worker)."""
        found = set()
        for child in psutil.Process().children(recursive=True):
            try:
                line = " ".join(child.cmdline())
                if "resource_tracker" not in line and child.status() != "zombie":
                    found.add(child.pid)
            except psutil.Error:
                continue
        return found

    before = workers()
    p = make(
        {
            "s": {"_target_": "core_stages.const", "resources": {"GPU": 1}},
            "t": {"_target_": "core_stages.add", "inputs": {"a": "s"}},
        },
        executor={"scheduler": "distributed", "n_workers": 1, "resources": {"GPU": 1}},
    )
    result = p.run(progress=False)
    assert result["t"] == 1
    assert "pipekit: Dask local cluster: http://127.0.0.1:" in capsys.readouterr().err
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and workers() - before:  # the workers it started end
        time.sleep(0.2)
    assert not workers() - before


def test_cluster_keys_are_refused_for_a_local_scheduler():
    p = make({"s": {"_target_": "core_stages.const"}}, executor={"address": "tcp://x:8786"})
    with pytest.raises(
        pk.ConfigError, match=r"executor.address is a setting of executor=distributed"
    ):
        p.validate()


def test_runs_sharing_a_scheduler_never_share_a_stages_result(cluster):
    """Dask keeps the first task of a key it holds: another client's `s` must not be ours."""
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as other:
        held = other.submit(int, 99, key="s", pure=False)  # another user's task named `s`
        assert held.result(timeout=60) == 99
        p = make(
            {"s": {"_target_": "core_stages.const", "params": {"value": 2}}}, executor=on(cluster)
        )
        assert p.run(progress=False)["s"] == 2
        assert held.result() == 99


def test_cli_unreachable_address_is_one_line_and_exit_2(cli_env, tmp_path):
    from conftest import run_pipekit

    proc = run_pipekit(
        "run", "executor=distributed", "executor.address=tcp://127.0.0.1:9",
        "tracking=off", "cache=off", env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "executor.address no Dask scheduler answers" in lines[0], lines
    valid = run_pipekit("validate", "executor=distributed", env=cli_env, cwd=tmp_path)
    assert valid.returncode == 0, valid.stderr


class Events(Observer):
    """Every stage event, as observers get them."""

    wants_outputs = False

    def __init__(self):
        self.events = []

    def stage_changed(self, event):
        self.events.append(event)

    def final(self, stage):
        return [e for e in self.events if e.stage == stage][-1]


def test_attempts_of_retried_stages_are_reported_as_on_threads(cluster, tmp_path, monkeypatch):
    """A stage that passed after retries shows `attempt 2/3` in progress, on its event and
    its MLflow stage run, exactly as with the local schedulers."""
    import io
    import re

    from mlflow import MlflowClient

    from pipekit.display.progress import TextProgress

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(executor: dict, folder):
        folder.mkdir()
        uri = f"sqlite:///{folder}/mlflow.db"
        attempts = "retry_stages.attempts"
        p = make(
            {
                "train": {
                    "_target_": attempts,
                    "params": {"log": str(folder / "train"), "fail_times": 1},
                    "retries": 2,
                },
                "use": {"_target_": "core_stages.add", "inputs": {"a": "train"}, "retries": 1},
                "never": {
                    "_target_": attempts,
                    "params": {"log": str(folder / "never"), "fail_times": 9},
                    "retries": 1,
                },
            },
            executor=executor,
            tracking={"backend": "local", "uri": uri},
            cache={"backend": "local", "path": str(folder / "cache")},  # tasks wrapped to store
        )
        events, out = Events(), io.StringIO()
        observers = [events, TextProgress(out, live=False)]
        result = p.run(progress=False, observers=observers, raise_on_failure=False)
        runs = MlflowClient(uri).search_runs([result.tracking["mlflow_experiment_id"]])
        tags = {r.data.tags.get("pipekit.stage"): r.data.tags for r in runs}
        train, use, never = events.final("train"), events.final("use"), events.final("never")
        line = next(x for x in out.getvalue().splitlines() if " train " in x)
        return {
            "status": dict(result.status),
            "use": result["use"],  # train's output, read by a dependent on the cluster
            "train": (train.state, train.attempt, train.attempts, train.meta["attempt_errors"]),
            "use_attempts": (use.attempt, use.attempts, "attempt_errors" in use.meta),
            "never": (never.state, never.attempt, never.attempts),
            "progress": re.findall(r"\(attempt \d+/\d+\)", line),
            "tags": {
                stage: (tags[stage].get("pipekit.attempts"), tags[stage].get("pipekit.first_error"))
                for stage in ("train", "use", "never")
            },
        }

    on_cluster = run(on(cluster), tmp_path / "distributed")
    assert on_cluster["train"] == ("done", 2, 3, ["ConnectionError: attempt 1 failed"])
    assert on_cluster["use"] == 2 and on_cluster["use_attempts"] == (1, 1, False)
    assert on_cluster["never"] == ("failed", 2, 2)
    assert on_cluster["progress"] == ["(attempt 2/3)"]
    assert on_cluster["tags"]["train"] == ("2/3", "ConnectionError: attempt 1 failed")
    assert on_cluster["tags"]["use"] == (None, None)
    assert on_cluster["tags"]["never"][0] == "2/2"
    assert on_cluster == run({"scheduler": "threads"}, tmp_path / "threads")

"""DAG-aware sweeps: one merged graph, shared stages computed once, a parent run per job."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest
import yaml
from conftest import run_pipekit

import pipekit as pk
from pipekit.cli import _merged_sweep
from pipekit.errors import SweepError
from pipekit.sweep import hydra_value, job_overrides, sweep_overrides


def write_pipeline(user_conf, log):
    body = {
        "name": "sw",
        "stages": {
            "a": {"_target_": "scale_stages.counted", "params": {"log": str(log), "name": "a"}},
            "b": {
                "_target_": "scale_stages.counted",
                "inputs": {"x": "a"},
                "params": {"log": str(log), "name": "b", "value": 10},
            },
            "c": {
                "_target_": "scale_stages.measured",
                "inputs": {"x": "b"},
                "params": {"log": str(log), "name": "c", "value": 0},
            },
        },
    }
    return user_conf({"pipeline/sw.yaml": "# @package _global_\n" + yaml.safe_dump(body)})


def counts(log):
    return Counter(log.read_text().split())


def test_a_sweep_of_3_computes_shared_stages_once_and_tracks_3_parent_runs(user_conf, tmp_path):
    from mlflow import MlflowClient

    log = tmp_path / "log"
    conf = write_pipeline(user_conf, log)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    table = pk.sweep(
        "sw",
        {"stages.c.params.value": [1, 2, 3]},
        config_dir=conf,
        overrides=["tracking=local", f"tracking.uri={uri}", "cache=off", "executor=threads"],
        best="c.total",
        progress=False,
    )
    assert counts(log) == {"a": 1, "b": 1, "c": 3}  # counted, not assumed
    assert [row["c.total"] for row in table] == [11, 12, 13]
    assert table.best["job"] == 2 and table.shared == 2 and table.tasks == 5
    assert "best: job #2 stages.c.params.value=3" in str(table)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sw").experiment_id
    runs = client.search_runs([experiment], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 3
    assert {p.data.tags["pipekit.sweep_id"] for p in parents} == {table.sweep_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    by_parent = {
        p.info.run_id: sorted(
            r.data.tags["mlflow.runName"]
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == p.info.run_id
        )
        for p in parents
    }
    first = table.jobs[0].tracking["mlflow_run_id"]
    assert by_parent[first] == ["a", "b", "c"]  # the shared stages' one nested run each
    stage_a = next(
        r.info.run_id
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == first and r.data.tags["mlflow.runName"] == "a"
    )
    for job in table.jobs[1:]:
        parent = client.get_run(job.tracking["mlflow_run_id"])
        assert by_parent[parent.info.run_id] == ["c"]  # linked, not duplicated
        assert parent.data.tags["pipekit.shared.a"] == stage_a
        assert parent.data.params["b.value"] == "10"
        assert parent.data.metrics["c.total"] == 10 + 1 + job.number


def test_a_cached_sweep_computes_nothing_the_second_time(user_conf, tmp_path):
    log = tmp_path / "log"
    conf = write_pipeline(user_conf, log)
    options = dict(config_dir=conf, progress=False)
    overrides = ["tracking=off", "cache=local", f"cache.path={tmp_path}/cache"]
    pk.sweep("sw", {"stages.c.params.value": [1, 2]}, overrides=overrides, **options)
    assert counts(log) == {"a": 1, "b": 1, "c": 2}
    again = pk.sweep("sw", {"stages.c.params.value": [1, 2, 3]}, overrides=overrides, **options)
    assert counts(log) == {"a": 1, "b": 1, "c": 3}  # only the new job's own stage
    assert again.results[0].status == {"a": "cached", "b": "cached", "c": "cached"}
    assert again.results[2].status["c"] == "done"


def test_cli_multirun_runs_one_merged_graph(user_conf, cli_env, tmp_path):
    log = tmp_path / "log"
    conf = write_pipeline(user_conf, log)
    proc = run_pipekit(
        "run", "-cd", str(conf), "pipeline=sw", "tracking=off", "cache=off",
        "-m", "stages.c.params.value=5,1", "--best", "c.total:min",
        env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert counts(log) == {"a": 1, "b": 1, "c": 2}
    assert "sweep of 2 jobs" in proc.stderr and "c#0 done" in proc.stderr
    assert "best: job #1 stages.c.params.value=1 (c.total=11, min)" in proc.stdout


def test_cli_sweep_links_the_experiment_once_and_each_jobs_parent_run(user_conf, cli_env, tmp_path):
    """As `pipekit run` closes: links in the MLflow UI's "Model training" view."""
    from mlflow import MlflowClient

    conf = write_pipeline(user_conf, tmp_path / "log")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_pipekit(
        "run", "-cd", str(conf), "pipeline=sw", "tracking=local", f"tracking.uri={store}",
        "cache=off", "-m", "stages.c.params.value=5,1",
        env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sw").experiment_id
    parents = client.search_runs([experiment], "tags.`pipekit.sweep_id` != ''")
    assert len(parents) == 2
    job_run = {int(p.data.tags["pipekit.sweep_job"].split(":")[0]): p for p in parents}
    view = "workflowType=machine_learning"
    runs_table = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"
    sweep_id = parents[0].data.tags["pipekit.sweep_id"]
    closing = [line for line in proc.stderr.splitlines() if "parent runs tagged" in line]
    assert closing == [
        f"pipekit: tracked 2 parent runs tagged pipekit.sweep_id={sweep_id} in MLflow "
        f"experiment {experiment} ({store}) at {runs_table}?{view}; "
        f"browse: mlflow ui --backend-store-uri {store}"
    ]
    table = proc.stdout[proc.stdout.index("sweep ") :].splitlines()
    assert table[1].split()[-1] == "mlflow_run"
    for number, run in job_run.items():
        row = table[2 + number].split()
        assert row[0] == str(number)
        assert row[-1] == f"{runs_table}/{run.info.run_id}?{view}"  # the job's own run


def test_cli_sweep_with_an_unknown_metric_is_a_config_error(user_conf, cli_env, tmp_path):
    conf = write_pipeline(user_conf, tmp_path / "log")
    proc = run_pipekit(
        "run", "-cd", str(conf), "pipeline=sw", "tracking=off", "cache=off",
        "-m", "stages.c.params.value=1,2", "--best", "cc.total",
        env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "sweep.metric 'cc.total'" in proc.stderr and "did you mean 'c'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "log").exists()


def test_other_launchers_keep_hydras_multirun():
    args = argparse.Namespace(explain=False)
    assert _merged_sweep(args, ["-m"], ["x=1,2"])
    assert _merged_sweep(args, ["--multirun"], ["hydra/launcher=basic", "x=1,2"])
    assert not _merged_sweep(args, ["-m"], ["hydra/launcher=joblib", "x=1,2"])
    assert not _merged_sweep(args, ["-m"], ["hydra/sweeper=optuna", "x=1,2"])
    assert not _merged_sweep(args, [], ["x=1,2"])
    assert not _merged_sweep(args, ["-m", "--cfg", "job"], ["x=1,2"])
    assert not _merged_sweep(args, ["-m"], ["hydra.sweep.dir=swp", "x=1,2"])  # Hydra's outputs


def test_jobs_are_enumerated_by_hydras_sweeper():
    jobs, swept = job_overrides(["a=1,2", "b=range(0,2)", "c=3"])
    assert swept == ["a", "b"]
    assert jobs == [
        ["a=1", "b=0", "c=3"],
        ["a=1", "b=1", "c=3"],
        ["a=2", "b=0", "c=3"],
        ["a=2", "b=1", "c=3"],
    ]
    assert sweep_overrides({"x": [0.1, "it's", None, True, [1, 2]]}) == [
        "x=0.1,'it\\'s',null,true,[1,2]"
    ]
    assert hydra_value({"k": "v"}) == "{k:'v'}"
    with pytest.raises(SweepError, match="no values"):
        sweep_overrides({"x": []})


def test_jobs_compose_as_pk_load_composes_them(user_conf):
    from pipekit.sweep import compose_jobs

    conf = write_pipeline(user_conf, "log")
    job = ["pipeline=sw", "tracking=off", "stages.c.params.value=4", "+stages.a.params.value=2"]
    fast = compose_jobs([job], config_dir=conf)[0]
    assert fast.spec.config == pk.load(None, overrides=job, config_dir=conf).spec.config
    assert fast.stages["c"].params["value"] == 4 and fast.stages["a"].params["value"] == 2
    with pytest.raises(pk.ConfigError, match=r"sweep job #0: config: .*stages.c.params.nope"):
        compose_jobs([["pipeline=sw", "stages.c.params.nope=1"]], config_dir=conf)


def test_pk_sweep_takes_the_pipelines_run_lock(user_conf, tmp_path):
    """While another run holds the lock, a sweep with concurrency=skip runs nothing."""
    import fcntl

    from pipekit.errors import RunSkipped
    from pipekit.runlock import lock_path

    log = tmp_path / "log"
    conf = write_pipeline(user_conf, log)
    common = ["tracking=off", "cache=local", "executor=sync", "++concurrency=skip"]
    path = lock_path(pk.load("sw", overrides=common, config_dir=conf).spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as other:  # another holder, as another process would be
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RunSkipped, match=r"pipeline 'sw': skipped: the previous run"):
            pk.sweep("sw", {"stages.c.params.value": [1, 2]}, config_dir=conf, overrides=common)
    assert not log.exists()  # nothing ran
    table = pk.sweep("sw", {"stages.c.params.value": [1, 2]}, config_dir=conf, overrides=common)
    assert table.ok and counts(log) == {"a": 1, "b": 1, "c": 2}

"""`schedule` validation and `pipekit export airflow` without Airflow: the DAG file's
shape, what it imports at parse time, and the errors (tests/test_airflow.py runs it)."""

from __future__ import annotations

import ast
import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make, pipeline_file
from conftest import run_pipekit as pipekit

import pipekit as pk
from pipekit.errors import ConfigError, ConfigTypeError, ExportError, ScheduleError, StageError
from pipekit.export.airflow import export_dag, task_spec
from pipekit.export.task import run_stage
from pipekit.pipeline import Pipeline

PARSE_TIME_MODULES = {"__future__", "datetime", "os", "subprocess", "sys", "uuid", "airflow"}


@pytest.mark.parametrize(
    "schedule", ["*/5 * * * *", "0 3 * * mon-fri", "0,30 8-18/2 1 jan-jun 0", "@daily", None]
)
def test_valid_schedules(schedule):
    make({"a": {"_target_": "const"}}, schedule=schedule).validate()


@pytest.mark.parametrize(
    ("schedule", "detail"),
    [
        ("*/5 * * *", "has 4 fields, not 5"),
        ("61 * * * *", "has minute 61, outside 0-59"),
        ("* * * 13 *", "has month 13, outside 1-12"),
        ("* * * * funday", "has day-of-week 'funday', not a number 0-7 or sun-sat"),
        ("5/15 * * * *", "has minute '5/15': a step needs * or a range (e.g. */15)"),
        ("*/0 * * * *", "has minute step 0 in '*/0'"),
        ("* 18-8 * * *", "has hour range '18-8' that runs backwards"),
        ("@reboot", "is not a preset both cron and Airflow know"),
    ],
)
def test_bad_schedules_name_the_key_and_the_fault(schedule, detail):
    with pytest.raises(ScheduleError) as caught:
        make({"a": {"_target_": "const"}}, name="p", schedule=schedule).validate()
    assert str(caught.value) == (
        f"pipeline 'p': schedule '{schedule}' {detail}; write it as cron's five fields "
        f"(minute hour day-of-month month day-of-week) or one of @hourly, @daily, @weekly, "
        f"@monthly, @yearly, e.g. schedule='*/5 * * * *' (every 5 minutes)"
    )


def test_a_schedule_that_is_no_string_is_a_type_error():
    with pytest.raises(ConfigTypeError, match=r"pipeline 'p': schedule must be a cron string"):
        make({"a": {"_target_": "const"}}, name="p", schedule=5).validate()


def test_a_bad_schedule_on_the_command_line_exits_2(cli_env, tmp_path):
    proc = pipekit("validate", "pipeline=book", "schedule=@often", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "pipekit: error: pipeline 'book': schedule '@often' is not a preset both cron"
    )
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def exported(tmp_path: Path, *overrides: str, dag: str = "book.py") -> tuple[str, dict]:
    """Export the book pipeline; the DAG file's text and its constants."""
    pipeline = pk.load("book", overrides=list(overrides))
    done = export_dag(pipeline, tmp_path / "dags", workdir=tmp_path / "work")
    assert done.path == tmp_path / "dags" / dag
    text = done.path.read_text()
    constants = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                constants[node.targets[0].id] = ast.unparse(node.value)
    return text, constants


def test_the_dag_file_has_one_task_per_stage_with_the_same_edges(tmp_path):
    text, constants = exported(tmp_path, "vars.data_dir=/srv/book")
    pipeline = pk.load("book")
    assert constants["DAG_ID"] == "book" and constants["SCHEDULE"] == "*/5 * * * *"
    assert constants["WORKDIR"] == str(tmp_path / "work") and constants["PYTHON"] is None
    assert constants["OVERRIDES"] == ["pipeline=book", "vars.data_dir=/srv/book"]
    assert constants["CONFIG_DIR"] is None and constants["CONFIG_NAME"] == "config"
    stages = ast.literal_eval(
        re.search(r"^STAGES = (\{.*?^\})", text, re.S | re.M)
        .group(1)
        .replace(  # type: ignore[union-attr]
            "datetime.timedelta(seconds=0.0)", "0.0"
        )
    )
    assert list(stages) == pipeline.graph.order()
    assert {name: list(up) for name, (up, _) in stages.items()} == {
        name: list(pipeline.stages[name].upstream) for name in pipeline.stages
    }
    assert stages["collect_1"][1] == {"retries": 2, "retry_delay": 0.0}  # pipekit: at once
    assert stages["train"][1] == {"retries": 0}
    assert "max_active_runs=1" in text and "catchup=False" in text


def imports(nodes) -> set[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
    return found


def test_the_dag_file_imports_only_the_standard_library_and_airflow(tmp_path):
    """Airflow parses DAG files every few seconds: pipekit (Hydra, MLflow) loads only
    inside the task function, when a task runs."""
    text, _ = exported(tmp_path)
    tree = ast.parse(text)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    at_parse = imports(n for n in ast.walk(tree) if not any(n in ast.walk(f) for f in functions))
    assert {name.split(".")[0] for name in at_parse} <= PARSE_TIME_MODULES, at_parse
    in_tasks = imports(ast.walk(tree)) - at_parse
    assert in_tasks == {"pipekit.export.task", "airflow.sdk.exceptions", "airflow.exceptions"}


def test_the_task_command_keeps_retries_in_airflow_and_never_skips(tmp_path):
    text, _ = exported(tmp_path)
    assert 'return [*OVERRIDES, f"++stages.{stage}.retries=0", "++concurrency=wait"]' in text
    assert text.count("task_overrides(stage)") == 2  # in the task's process and in PYTHON's


def test_config_dir_and_name_are_passed_absolute(tmp_path, user_conf):
    defaults = [{"pipeline": "book"}, {"tracking": "off"}, {"cache": "local"}, "_self_"]
    conf = user_conf({"mine.yaml": {"defaults": defaults, "seed": 1}})
    pipeline = pk.load("book", config_dir=conf, config_name="mine")
    done = export_dag(pipeline, tmp_path / "out.py", dag_id="book_mine")
    text = done.path.read_text()
    assert done.path == tmp_path / "out.py" and "DAG_ID = 'book_mine'" in text
    assert f"CONFIG_DIR = '{conf.resolve()}'\nCONFIG_NAME = 'mine'\n" in text


def test_retry_delay_and_timeout_are_read_when_a_stage_has_them(tmp_path):
    """Keys a later pipekit adds (`retry_delay`, `timeout`, `stage_defaults`) map to
    Airflow's own without a change here."""
    base = make({"a": {"_target_": "const", "retries": 3}, "b": {"_target_": "const"}})
    config = {
        **base.config,
        "stages": {
            "a": {**base.config["stages"]["a"], "retry_delay": "30s", "timeout": 90},
            "b": dict(base.config["stages"]["b"]),
        },
        "stage_defaults": {"retries": 1, "retry_delay": 5},
    }
    pipeline = Pipeline(replace(base.spec, config=config))
    assert task_spec(pipeline, "a") == task_spec(pipeline, "a").__class__("a", (), 3, 30.0, 90.0)
    assert task_spec(pipeline, "b").retries == 1 and task_spec(pipeline, "b").retry_delay == 5.0
    config["stages"]["a"]["timeout"] = "soon"
    with pytest.raises(ConfigTypeError, match=r"stage 'a' timeout must be seconds or a dur"):
        task_spec(pipeline, "a")


def test_export_needs_a_cache(cli_env, tmp_path):
    proc = pipekit("export", "airflow", "pipeline=book", "cache=off", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "pipekit: error: pipeline 'book': cache: the cache is off, but each Airflow task runs "
        "one stage and takes its inputs from the cache; use cache=local (one machine) or "
        "cache=fsspec cache.url=s3://bucket/cache (several workers)\n"
    )
    assert not (tmp_path / "dags").exists()


def test_export_needs_a_composed_pipeline(tmp_path):
    pipeline = make({"a": {"_target_": "const"}}, name="p", cache={"backend": "local"})
    with pytest.raises(ExportError, match=r"only a pipeline composed from config files"):
        export_dag(pipeline, tmp_path)


def test_export_refuses_a_file_as_the_folder(tmp_path):
    (tmp_path / "dags").write_text("")
    with pytest.raises(ExportError, match=r"-o .*dags: '.*dags' is a file, not a directory"):
        export_dag(pk.load("book"), tmp_path / "dags")


def test_export_command_targets_and_sweeps(cli_env, tmp_path):
    typo = pipekit("export", "airflw", "pipeline=book", env=cli_env, cwd=tmp_path)
    assert typo.returncode == 2
    assert "unknown export target 'airflw' (did you mean 'airflow'?)" in typo.stderr
    sweep = pipekit(
        "export", "airflow", "-m", "pipeline=book", "seed=1,2", env=cli_env, cwd=tmp_path
    )
    assert sweep.returncode == 2 and "export writes one config, not a -m sweep" in sweep.stderr
    done = pipekit("export", "airflow", "pipeline=book", "-o", "d", env=cli_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("wrote d/book.py: Airflow DAG 'book', 6 tasks, schedule '*/5 * * * *'\n")


def test_a_task_runs_its_stage_in_the_export_directory_upstream_from_the_cache(tmp_path):
    """What each Airflow task calls (pipekit/export/task.py), without Airflow."""
    work = tmp_path / "work"
    work.mkdir()
    overrides = ["pipeline=book", "tracking=off", "executor=sync"]
    first = run_stage("collect_1", overrides, workdir=str(work), run_id="dagrun")
    assert first.status == {"init_data_dir": "done", "collect_1": "done"}
    assert (work / "data/raw/source_1.csv").is_file()  # relative paths: the task's workdir
    second = run_stage("combine", overrides, workdir=str(work), run_id="dagrun")
    assert second.status == {
        "init_data_dir": "cached",
        "collect_1": "cached",
        "collect_2": "done",
        "combine": "done",
    }
    assert Path.cwd() == tmp_path and "PIPEKIT_RUN_ID" not in os.environ  # both restored
    gate = [*overrides, "stages.publish.params.threshold=0.999"]
    with pytest.raises(StageError, match=r"stage 'publish' failed: QualityGateError"):
        run_stage("publish", gate, workdir=str(work), run_id="dagrun")  # Airflow retries it
    with pytest.raises(ConfigError) as caught:  # the DAG fails the task without retrying
        run_stage("train", [*overrides, "+stages.train.params.CC=1"], workdir=str(work), run_id="x")
    assert caught.value.exit_code == 2 and "'CC'" in str(caught.value)


def test_a_tracked_task_leaves_mlflow_to_the_fork_server(tmp_path, user_conf, cli_env):
    """Each Airflow task is a new process: like `pipekit run`, it never imports MLflow
    (seconds of CPU per task); a fork of the fork server writes its runs."""
    conf = user_conf(pipeline_file("probe", probe="{_target_: test_tracking_faults.probe}"))
    db = tmp_path / "mlflow.db"
    command = [sys.executable, "-m", "pipekit.export.task", "--workdir", str(tmp_path)]
    overrides = ["pipeline=probe", "executor=sync", "cache=off", f"tracking.uri=sqlite:///{db}"]
    done = subprocess.run(
        [*command, "-cd", str(conf), "probe", "--", *overrides],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "probe: mlflow_in_driver=0"
    assert lines[1].startswith("pipekit: tracked in MLflow run ")
    with sqlite3.connect(db) as con:
        assert [s for (s,) in con.execute("SELECT status FROM runs")] == ["FINISHED"] * 2

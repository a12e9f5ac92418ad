"""The exported book pipeline under real Apache Airflow (`make airflow` installs it in
`.airflow-venv`, with pipekit): `airflow dags test` passes, and MLflow holds the run tree
a local run makes.

"The same run tree" when every Airflow task is its own pipekit run of `targets=[stage]`:
- one MLflow parent run per task, all sharing one `pipekit.run_id` (the DAG run's);
- across them, exactly one nested run *computed* each stage (no `pipekit.cache_hit`),
  under the parent of that stage's task, the `cache: false` collectors included (later
  tasks take their output from the collector's task: `already ran in this run`); every
  other nested run of the stage is a cache hit whose `pipekit.cache_source_run` names
  that computed run;
- the computed runs carry the params and metrics of the local run's nested runs, and the
  registry holds what a local run registers: one `book.train` version, `@champion`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from conftest import run_pipekit as pipekit

import pipekit as pk

VENV = Path(os.environ.get("PIPEKIT_AIRFLOW_VENV", REPO / ".airflow-venv"))
AIRFLOW = VENV / "bin" / "airflow"
STAGES = ["init_data_dir", "collect_1", "collect_2", "combine", "train", "publish"]

#: Runs in the Airflow venv: the DAG as Airflow parses it, and what parsing imported.
PARSE = """
import json, sys
try:
    from airflow.dag_processing.dagbag import DagBag  # Airflow 3
except ImportError:
    from airflow.models.dagbag import DagBag  # Airflow 2
bag = DagBag(sys.argv[1])
dag = bag.dags.get("book")
print("RESULT", json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "schedule": str(getattr(dag, "schedule", None) or dag.schedule_interval),
    "max_active_runs": dag.max_active_runs,
    "catchup": dag.catchup,
    "tasks": {
        t.task_id: [sorted(t.upstream_task_ids), t.retries, t.retry_delay.total_seconds()]
        for t in dag.tasks
    },
    "heavy": sorted(
        m for m in sys.modules if m.split(".")[0] in ("pipekit", "hydra", "mlflow", "dask")
    ),
}))
"""


def background(name: str, command: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """Start `command` with its output in `<cwd>/<name>.log`."""
    with open(cwd / f"{name}.log", "w") as log:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )


def finish(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise


def airflow_env(tmp_path: Path) -> dict[str, str]:
    """A standalone Airflow: SQLite metadata and DAGs folder in tmp_path, no examples."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "MLFLOW_", "PIPEKIT_")) and k != "PYTHONPATH"
    }
    if "PIPEKIT_RUNTIME_DIR" in os.environ:  # the test session's fork servers (conftest)
        env["PIPEKIT_RUNTIME_DIR"] = os.environ["PIPEKIT_RUNTIME_DIR"]
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(tmp_path / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def stage_runs(uri: str) -> tuple[list, list, object]:
    """(parent runs, nested runs, client) of experiment `book` in the store at `uri`; the
    run of the book.serving export (`serve.export_on_promote`) is checked on its own."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("book")
    assert experiment is not None, f"no experiment 'book' in {uri}"
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    exports = [r for r in runs if r.data.tags.get("mlflow.source.name") == "pipekit:export:book"]
    assert [r.info.status for r in exports] == ["FINISHED"]  # the promotion exported once
    runs = [r for r in runs if r not in exports]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, nested, client


def described(run, data_dir: Path) -> tuple[dict, dict]:
    """A computed stage run's params (data paths made relative) and metrics."""
    params = {k: v.replace(str(data_dir), "<data>") for k, v in run.data.params.items()}
    metrics = {k: v for k, v in run.data.metrics.items() if k != "duration_s"}
    return params, metrics


@pytest.mark.timeout(240)
def test_exported_book_dag_passes_airflow_dags_test_with_the_local_run_tree(tmp_path, cli_env):
    assert AIRFLOW.is_file(), f"no Airflow at {AIRFLOW}: run `make airflow` (make test does)"
    env = airflow_env(tmp_path)
    work, local = tmp_path / "work", tmp_path / "local"
    work.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started = time.monotonic()
    python = str(VENV / "bin" / "python")
    # in parallel: Airflow's metadata DB, a local reference run, parsing the exported DAG
    jobs = {
        "migrate": background("migrate", [str(AIRFLOW), "db", "migrate"], tmp_path, env),
        "reference": background(
            "reference",
            [
                sys.executable,
                "-m",
                "pipekit.cli",
                "run",
                "pipeline=book",
                f"vars.data_dir={local}/data",
                f"cache.path={local}/cache",
                f"tracking.uri=sqlite:///{local}/mlflow.db",
                "executor=sync",
            ],
            tmp_path,
            cli_env,
        ),
    }
    try:
        export = pipekit(
            "export",
            "airflow",
            "pipeline=book",
            f"vars.data_dir={work}/data",
            f"tracking.uri={uri}",
            "-o",
            str(tmp_path / "dags"),
            "--workdir",
            str(work),
            env=cli_env,
            cwd=tmp_path,
            timeout=120,
        )
        assert export.returncode == 0, export.stderr
        jobs["parse"] = background(
            "parse", [python, "-c", PARSE, str(tmp_path / "dags")], tmp_path, env
        )
        for name in ("migrate", "parse"):
            assert finish(jobs[name], 150) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        print(f"migrated and parsed after {time.monotonic() - started:.0f} s")

        test = subprocess.run(
            [str(AIRFLOW), "dags", "test", "book"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        print(f"dags test done after {time.monotonic() - started:.0f} s")
        assert finish(jobs["reference"], 60) == 0, (tmp_path / "reference.log").read_text()
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.wait(timeout=10)
    output = test.stdout + test.stderr
    (tmp_path / "dags-test.log").write_text(output)
    ran = "\n".join(line for line in output.splitlines() if not line.startswith(("20", " ")))
    assert test.returncode == 0, ran[-5000:]
    assert "state=success" in output
    for count, stage in zip((1, 2, 2, 4, 5, 6), STAGES, strict=True):
        assert f"[{count}/{count}] {stage} done" in output  # its task computed it, last
    assert (work / "data/combined.csv").is_file()

    # the DAG as Airflow reads it: the pipeline's edges, retries and schedule, no pipekit
    dag = json.loads((tmp_path / "parse.log").read_text().split("RESULT ", 1)[1].splitlines()[0])
    pipeline = pk.load("book")
    assert dag["errors"] == {} and dag["heavy"] == []
    assert dag["schedule"] == "*/5 * * * *" and dag["max_active_runs"] == 1
    assert dag["catchup"] is False
    assert sorted(dag["tasks"]) == sorted(STAGES)
    for name, (upstream, retries, delay) in dag["tasks"].items():
        assert upstream == sorted(pipeline.stages[name].upstream), name
        assert retries == pipeline.stages[name].retries, name
        if retries:
            assert delay == 0.0  # as pipekit: a failed attempt is retried at once

    # the local run: one parent, one computed nested run per stage
    local_parents, local_nested, local_client = stage_runs(f"sqlite:///{local}/mlflow.db")
    assert len(local_parents) == 1
    assert sorted(r.data.tags["pipekit.stage"] for r in local_nested) == sorted(STAGES)
    expected = {r.data.tags["pipekit.stage"]: described(r, local / "data") for r in local_nested}
    assert "pipekit: 6 done" in (tmp_path / "reference.log").read_text()

    # the Airflow DAG run: one parent per task, one pipekit.run_id, each stage computed once
    parents, nested, client = stage_runs(uri)
    runs = parents + nested
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["pipekit.run_id"] for r in runs}) == 1
    by_target = {p.data.tags["pipekit.stages"].split(",")[-1]: p for p in parents}
    assert sorted(by_target) == sorted(STAGES) and len(parents) == len(STAGES)
    for target, parent in by_target.items():
        assert parent.data.tags["pipekit.stages"].split(",") == pipeline.plan(target)
    computed = {}
    for run in nested:
        stage = run.data.tags["pipekit.stage"]
        if run.data.tags.get("pipekit.cache_hit") != "true":
            assert stage not in computed, f"{stage} computed twice"
            computed[stage] = run
    assert sorted(computed) == sorted(STAGES)
    # every task's parent has one nested run per stage it planned, and across the DAG run
    # each stage (the `cache: false` collectors too) is computed by exactly one of them
    for stage in STAGES:
        runs_of = [r for r in nested if r.data.tags["pipekit.stage"] == stage]
        planned_by = [t for t in STAGES if stage in pipeline.plan(t)]
        assert len(runs_of) == len(planned_by), stage
        hits = [r for r in runs_of if r.data.tags.get("pipekit.cache_hit") == "true"]
        assert len(runs_of) - len(hits) == 1, f"{stage}: {len(runs_of) - len(hits)} computed"
    for collector in ("collect_1", "collect_2"):  # combine, train, publish took its output
        taken = f"] {collector} cached (already ran in this run ({collector}))"
        assert output.count(taken) == 3, collector
    for stage, run in computed.items():
        assert run.data.tags["mlflow.parentRunId"] == by_target[stage].info.run_id
        assert described(run, work / "data") == expected[stage], stage
    for run in nested:
        stage = run.data.tags["pipekit.stage"]
        if run.info.run_id != computed[stage].info.run_id:
            assert run.data.tags["pipekit.cache_source_run"] == computed[stage].info.run_id

    # the registry: what a local run registers, promotes and exports for serving
    for store in (client, local_client):
        for model in ("book.train", "book.serving"):
            versions = store.search_model_versions(f"name='{model}'")
            assert [str(v.version) for v in versions] == ["1"], model
            aliases = store.get_registered_model(model).aliases
            assert {k: str(v) for k, v in aliases.items()} == {"champion": "1"}, model


#: Runs in the Airflow venv: the exported DAG's task functions, each printing how it ended.
TASKS = """
import pathlib, runpy, sys
dag = runpy.run_path(sys.argv[1])

def attempt(how, stage, *extra):
    saved = list(dag['OVERRIDES'])
    dag['OVERRIDES'].extend(extra)
    try:
        dag[how](stage, 'dagrun')
        print('ENDED', how, stage, 'ok')
    except Exception as error:
        print('RAISED', how, stage, type(error).__name__, error)
    finally:
        dag['OVERRIDES'][:] = saved

attempt('run_in_subprocess', 'collect_1')
attempt('run_in_subprocess', 'train', '+stages.train.params.CC=1')
pathlib.Path(sys.argv[2], 'data/batches/batch-0001.json').write_text('not json')
attempt('run_in_subprocess', 'collect_1', '++stages.collect_1.retry_on=[ConnectionError]')
attempt('run_in_process', 'collect_1', '++stages.collect_1.retry_on=[ConnectionError]')
attempt('run_in_process', 'collect_1', '++stages.collect_1.retry_on=[ValueError]')
"""


@pytest.mark.timeout(180)
def test_with_python_set_a_task_runs_pipekit_from_another_environment(tmp_path, cli_env):
    """`--python`: pipekit lives in another virtual environment than Airflow; the task
    runs `<python> -m pipekit.export.task <stage>` there, streaming its output. A config
    error, or an error the stage's `retry_on` does not list, fails the task with Airflow's
    AirflowFailException (no retry), in that mode and in the task's own process; an error
    `retry_on` lists is raised as it is, for Airflow to retry."""
    assert AIRFLOW.is_file(), f"no Airflow at {AIRFLOW}: run `make airflow` (make test does)"
    work = tmp_path / "work"
    work.mkdir()
    export = pipekit(
        "export",
        "airflow",
        "pipeline=book",
        "tracking=off",
        "-o",
        str(tmp_path / "dags"),
        "--workdir",
        str(work),
        "--python",
        sys.executable,  # this test's environment: no Airflow in it
        env=cli_env,
        cwd=tmp_path,
        timeout=60,
    )
    assert export.returncode == 0, export.stderr
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", TASKS, str(tmp_path / "dags" / "book.py"), work],
        env=airflow_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=160,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert (
        f"pipekit task: {sys.executable} -m pipekit.export.task --workdir {work} collect_1 -- "
        "pipeline=book tracking=off ++stages.collect_1.retries=0 ++concurrency=wait" in out
    )
    assert "[2/2] collect_1 done" in out and (work / "data/raw/source_1.csv").is_file()
    assert "ENDED run_in_subprocess collect_1 ok" in out
    assert (
        "RAISED run_in_subprocess train AirflowFailException stage 'train': invalid config "
        "(pipekit exit 2), see above" in out
    )
    # a malformed batch file: collect_1 raises ValueError
    assert (
        "RAISED run_in_subprocess collect_1 AirflowFailException stage 'collect_1' failed with "
        "an error its retry_on does not list (pipekit exit 3), see above" in out
    )
    not_retried = (
        "RAISED run_in_process collect_1 AirflowFailException pipeline 'book': stage "
        "'collect_1' failed: ValueError: "
    )
    assert not_retried in out
    line = out.split(not_retried, 1)[1].splitlines()[0]
    assert line.endswith(
        "; ValueError is not in its retry_on (ConnectionError), so it is not retried"
    )
    assert (
        "RAISED run_in_process collect_1 StageError pipeline 'book': stage 'collect_1' "
        "failed: ValueError: " in out
    )


def test_retry_on_decides_whether_the_task_may_be_retried(tmp_path, capsys):
    """The task runner itself, without Airflow: an error outside the failing stage's
    `retry_on` (its own or `stage_defaults`') is StageNotRetriedError, exit code 3 from
    `python -m pipekit.export.task`; one it lists, or no `retry_on`, stays a StageError
    (exit 1), which Airflow retries."""
    from pipekit.errors import StageError, StageNotRetriedError
    from pipekit.examples import book
    from pipekit.export import task

    book.init_data_dir(str(tmp_path / "data"))
    (tmp_path / "data/batches/batch-0001.json").write_text("not json")
    base = ["pipeline=book", "tracking=off", f"vars.data_dir={tmp_path}/data"]
    base.append("++stages.collect_1.retries=0")  # as the DAG file does: Airflow retries

    def run(*extra: str) -> BaseException:
        with pytest.raises(StageError) as info:
            task.run_stage("collect_1", [*base, *extra], workdir=str(tmp_path), run_id="r1")
        return info.value

    for extra, listed in (
        (
            "++stages.collect_1.retry_on=[ConnectionError,TimeoutError]",
            "ConnectionError, TimeoutError",
        ),
        ("++stage_defaults.retry_on=[OSError]", "OSError"),
    ):
        refused = run(extra)
        assert isinstance(refused, StageNotRetriedError), extra
        assert refused.stage == "collect_1" and isinstance(refused.cause, ValueError)
        message = str(refused)
        assert message.startswith("pipeline 'book': stage 'collect_1' failed: ValueError: ")
        assert message.endswith(
            f"; ValueError is not in its retry_on ({listed}), so it is not retried"
        )
    for extra in (["++stages.collect_1.retry_on=[ValueError]"], []):
        kept = run(*extra)
        assert type(kept) is StageError and isinstance(kept.cause, ValueError), extra

    argv = ["--workdir", str(tmp_path), "collect_1", "--", *base]
    capsys.readouterr()
    assert task.main([*argv, "++stages.collect_1.retry_on=[ConnectionError]"]) == 3
    assert task.main(argv) == 1
    assert task.main([*argv, "stages.collect_1.retries=many"]) == 2
    err = capsys.readouterr().err
    assert "pipekit: error: pipeline 'book': stage 'collect_1' failed: ValueError" in err
    assert "Traceback" in err  # the stage's traceback, for the task log

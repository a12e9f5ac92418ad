"""Faults in stages and signals to the run: nothing left running, nothing silent.

Stages that exit, hang, die or return what cannot cross processes; SIGINT and SIGTERM on
every executor (real subprocesses, a real MLflow SQLite store); kill -9 of the driver.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import kill_group, make, mlflow_run_running, run_pipekit, until

from pipekit.errors import StageError, UnpicklableOutputError

EXECUTORS = ["sync", "threads", "processes"]


# --- helpers ------------------------------------------------------------------------------


def write_conf(root: Path, stages: dict, name: str = "faults") -> Path:
    """A primary config `faults.yaml` using pipekit's executor/tracking/cache groups."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "defaults": [{"executor": "threads"}, {"tracking": "off"}, {"cache": "off"}, "_self_"],
        "name": name,
        "stages": stages,
    }
    (root / "faults.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def cli(conf: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipekit.cli",
        "run",
        "-cd",
        str(conf),
        "-cn",
        "faults",
        *overrides,
    ]


def start(command: list[str], env: dict, cwd: Path, **extra) -> subprocess.Popen:
    """A pipekit process in its own session (signals sent to it reach only its group)."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(
        command, env=env, cwd=cwd, start_new_session=True, **{**options, **extra}
    )


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 90) -> int:
    """The pid a `hang` stage wrote to `path`, once it runs (bounded; fails if proc ended)."""

    def started() -> bool:
        if proc.poll() is not None:
            _out, err = proc.communicate(timeout=10)
            pytest.fail(f"pipekit ended before the stage ran ({proc.returncode}):\n{err}")
        return path.exists()

    until(started, f"{path.name} to start", seconds)
    return int(path.read_text())


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pids: list[int], seconds: float = 20) -> None:
    """Every process in `pids` ends within `seconds` (a bounded wait, not a timing claim)."""
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:  # do not leave them to the next test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def mlflow_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def reset_sigint() -> None:  # pragma: no cover - runs in the child before exec
    """A child started from a background job inherits SIGINT ignored; a terminal's does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- 1. a stage that calls sys.exit fails that stage -------------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
def test_sys_exit_in_a_stage_fails_that_stage(executor):
    p = make(
        {
            "bad": {"_target_": "exits", "params": {"code": 0}},
            "after": {"_target_": "add", "inputs": {"a": "bad"}},
            "other": {"_target_": "const", "params": {"value": 7}},
        },
        executor={"scheduler": executor, "num_workers": 2},
    )
    result = p.run(progress=False, raise_on_failure=False)
    assert result.status == {"bad": "failed", "after": "skipped", "other": "done"}
    assert result["other"] == 7
    message = str(result.errors["bad"])
    assert message == (
        "pipeline 't': stage 'bad' failed: SystemExit: 0 (a stage must not exit the process)"
    )
    assert isinstance(result.errors["bad"].cause, SystemExit)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_sys_exit_is_retried_like_any_error(executor, tmp_path):
    counter = tmp_path / "count"
    p = make(
        {"s": {"_target_": "exits_once", "params": {"counter": str(counter)}, "retries": 1}},
        executor={"scheduler": executor},
    )
    result = p.run(progress=False)
    assert result["s"] == 2 and counter.read_text() == "2"


@pytest.mark.parametrize("executor", EXECUTORS)
def test_cli_sys_exit_in_a_stage_exits_1_naming_the_stage(executor, tmp_path, cli_env):
    conf = write_conf(
        tmp_path / "conf",
        {
            "bad": {"_target_": "core_stages.exits", "params": {"code": 0}},
            "other": {"_target_": "core_stages.const", "params": {"value": 3}},
        },
    )
    proc = run_pipekit(
        "run", "-cd", str(conf), "-cn", "faults", f"executor={executor}", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "pipekit: error: pipeline 'faults': stage 'bad' failed: SystemExit: 0 "
        "(a stage must not exit the process)"
    ) in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr


# --- 2. an output that cannot travel between processes ------------------------------------


def test_unpicklable_output_under_processes_fails_only_that_stage():
    p = make(
        {
            "bad": {"_target_": "lock"},
            "after": {"_target_": "kwargs_ok", "inputs": {"x": "bad"}},
            "other": {"_target_": "const", "params": {"value": 5}},
            "more": {"_target_": "add", "inputs": {"a": "other"}, "params": {"b": 1}},
        },
        executor={"scheduler": "processes", "num_workers": 2},
    )
    result = p.run(progress=False, raise_on_failure=False)
    assert result.status == {"bad": "failed", "after": "skipped", "other": "done", "more": "done"}
    assert result["more"] == 6
    error = result.errors["bad"]
    assert isinstance(error, UnpicklableOutputError) and isinstance(error, StageError)
    message = str(error)
    assert message.startswith(
        "pipeline 't': stage 'bad' returned a dict that cannot be sent between processes ("
    )
    assert message.endswith("); return picklable data or use executor=threads")
    assert "lock" in message  # the cause names what could not be pickled


def test_unpicklable_output_is_fine_on_threads():
    p = make({"bad": {"_target_": "lock"}}, executor={"scheduler": "threads"})
    assert p.run(progress=False).status == {"bad": "done"}


def test_cli_unpicklable_output_is_one_line_exit_1(tmp_path, cli_env):
    conf = write_conf(
        tmp_path / "conf",
        {
            "bad": {"_target_": "core_stages.lock"},
            "other": {"_target_": "core_stages.const", "params": {"value": 3}},
        },
    )
    proc = run_pipekit(
        "run", "-cd", str(conf), "-cn", "faults", "executor=processes", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipekit: error:")]
    assert len(errors) == 1 and "cannot be sent between processes" in errors[0]
    assert "other done" in proc.stderr  # the independent branch finished


def test_a_worker_process_that_dies_fails_its_stage(tmp_path, cli_env):
    conf = write_conf(tmp_path / "conf", {"gone": {"_target_": "core_stages.dies"}})
    proc = run_pipekit(
        "run", "-cd", str(conf), "-cn", "faults", "executor=processes", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipekit: error:")]
    assert len(errors) == 1, proc.stderr
    assert "stage 'gone'" in errors[0] and "worker process" in errors[0]


# --- 3. SIGINT and SIGTERM end the run on every executor ----------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_ends_a_hung_run_killed_with_nothing_left(executor, sig, tmp_path, cli_env):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    conf = write_conf(
        tmp_path / "conf",
        {
            "first": {"_target_": "core_stages.const", "params": {"value": 1}},
            "stuck": {
                "_target_": "core_stages.hang",
                "inputs": {"x": "first"},
                "params": {"directory": str(tmp_path), "name": "stuck.pid"},
            },
        },
    )
    proc = start(
        cli(conf, f"executor={executor}", "tracking=local", f"tracking.uri={uri}"),
        cli_env,
        tmp_path,
        preexec_fn=reset_sigint,
    )
    try:
        worker = wait_for(tmp_path / "stuck.pid", proc)
        mlflow_run_running(tmp_path / "mlflow.db", "stuck", proc)
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        if executor == "processes":
            assert worker in children and worker != proc.pid
        else:
            assert worker == proc.pid
        if sig == signal.SIGINT:  # Ctrl-C: the terminal signals the whole process group
            os.killpg(proc.pid, sig)
        else:  # kill -TERM <pid>: CI timeouts, Kubernetes, Slurm
            proc.send_signal(sig)
        _out, err = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and said[0].startswith(f"pipekit: interrupted ({name}); "), err
    assert "stuck" in said[0]
    assert_gone(children)
    runs = {r.data.tags.get("mlflow.runName"): r for r in mlflow_runs(uri)}
    statuses = {r.info.status for r in runs.values()}
    assert "RUNNING" not in statuses, statuses
    assert runs["stuck"].info.status == "KILLED"
    assert runs["stuck"].data.tags["pipekit.error"] == f"interrupted ({name})"
    assert runs["first"].info.status == "FINISHED"
    parents = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED"]


def test_second_ctrl_c_prints_no_traceback(tmp_path, cli_env):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    conf = write_conf(
        tmp_path / "conf",
        {
            "stuck": {
                "_target_": "core_stages.hang",
                "params": {"directory": str(tmp_path), "name": "stuck.pid"},
            }
        },
    )
    proc = start(
        cli(conf, "executor=threads", "tracking=local", f"tracking.uri={uri}"),
        cli_env,
        tmp_path,
        preexec_fn=reset_sigint,
    )
    try:
        wait_for(tmp_path / "stuck.pid", proc)
        mlflow_run_running(tmp_path / "mlflow.db", "stuck", proc)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.2)  # the second one lands while the first is being handled, or after
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert len([line for line in err.splitlines() if "interrupted" in line]) == 1, err
    statuses = {r.data.tags.get("mlflow.runName", ""): r.info.status for r in mlflow_runs(uri)}
    assert statuses.pop("stuck") == "KILLED" and set(statuses.values()) == {"KILLED"}


# --- 4. kill -9 of the driver: the workers notice and exit --------------------------------


def test_workers_exit_after_kill_9_of_the_driver(tmp_path, cli_env):
    conf = write_conf(
        tmp_path / "conf",
        {
            name: {
                "_target_": "core_stages.hang",
                "params": {"directory": str(tmp_path), "name": f"{name}.pid"},
            }
            for name in ("left", "right")
        },
    )
    proc = start(
        cli(conf, "executor=processes", "executor.num_workers=2"),
        cli_env,
        tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        workers = [wait_for(tmp_path / f"{name}.pid", proc) for name in ("left", "right")]
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert set(workers) <= set(children) and proc.pid not in workers
        proc.kill()
        proc.wait(timeout=10)
        assert_gone(children)
    finally:
        kill_group(proc)


# --- the same from Python: SIGTERM stops the run cleanly, then ends the process ----------

API_RUN = """
import sys
import pipekit as pk

directory, uri = sys.argv[1], sys.argv[2]
p = pk.Pipeline.from_config({
    "name": "api",
    "stages": {
        "first": {"_target_": "core_stages.const"},
        "stuck": {"_target_": "core_stages.hang", "inputs": {"x": "first"},
                  "params": {"directory": directory, "name": "stuck.pid"}},
    },
    "executor": {"scheduler": "processes"},
    "tracking": {"backend": "local", "uri": uri},
})
if __name__ == "__main__":  # worker processes are spawned: they import this file too
    p.run(progress=False)
"""


def test_sigterm_to_a_python_program_ends_its_run_killed(tmp_path, cli_env):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = tmp_path / "api_run.py"
    script.write_text(API_RUN)
    proc = start([sys.executable, str(script), str(tmp_path), uri], cli_env, tmp_path)
    try:
        worker = wait_for(tmp_path / "stuck.pid", proc)
        mlflow_run_running(tmp_path / "mlflow.db", "stuck", proc)
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert worker in children
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGTERM, err  # ended by SIGTERM, as its sender meant
    assert "Traceback" not in err
    assert_gone(children)
    statuses = {r.data.tags.get("mlflow.runName", ""): r.info.status for r in mlflow_runs(uri)}
    assert statuses.pop("stuck") == "KILLED" and statuses.pop("first") == "FINISHED"
    assert list(statuses.values()) == ["KILLED"]  # the parent

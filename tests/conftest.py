"""Shared fixtures: build pipelines from dicts and write user config directories."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import pipekit as pk

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def run_pipekit(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 180, text: bool = True
) -> subprocess.CompletedProcess:
    """`pipekit <args>` in a subprocess (bounded by `timeout`), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipekit.cli", *args],
        capture_output=True,
        text=text,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def until(condition: Any, what: str, seconds: float = 120) -> None:
    """Poll `condition` (bounded in time), failing with `what` when it never holds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"never: {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """A test's cleanup: a pipekit process started in a process group of its own
    (`start_new_session=True`) and still running is killed with its whole group."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def pipeline_file(name: str, **stages: str) -> dict[str, str]:
    """A user config's `pipeline/<name>.yaml` (for `user_conf`), each stage's body given
    as a YAML flow mapping: `pipeline_file("p", a="{_target_: m.f}")`."""
    body = "".join(f"  {stage}: {spec}\n" for stage, spec in stages.items())
    return {f"pipeline/{name}.yaml": f"# @package _global_\nname: {name}\nstages:\n{body}"}


def mlflow_run_running(db: Path, name: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until the MLflow run `name` is RUNNING in the SQLite store `db` (bounded), read
    from the store's own table; fails at once when `proc` (the pipekit run) has ended."""
    import sqlite3

    def running() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"pipekit ended early ({proc.returncode}): {proc.communicate()[1]}")
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                found = con.execute("SELECT status FROM runs WHERE name = ?", (name,))
                return ("RUNNING",) in found.fetchall()
        except sqlite3.Error:  # not there yet, being created or migrated
            return False

    until(running, f"MLflow run {name!r} RUNNING in {db}", seconds)


def make(stages: dict[str, Any], name: str = "t", **top: Any) -> pk.Pipeline:
    """A pipeline from plain stage dicts, with `core_stages.` prefixed to short targets."""
    fixed = {}
    for stage, body in stages.items():
        if (
            isinstance(body, dict)
            and isinstance(body.get("_target_"), str)
            and "." not in body["_target_"]
        ):
            body = {**body, "_target_": f"core_stages.{body['_target_']}"}
        fixed[stage] = body
    return pk.Pipeline.from_config({"name": name, "stages": fixed, **top})


def local_cluster(request: pytest.FixtureRequest, workers: int) -> Any:
    """A real dask.distributed LocalCluster of `workers` processes (one thread each) on
    127.0.0.1, no dashboard port clash, closed when the requesting fixture's scope ends."""
    from distributed import LocalCluster

    local = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=40,
    )
    request.addfinalizer(local.close)
    return local


@pytest.fixture(scope="session", autouse=True)
def _fork_servers(tmp_path_factory):
    """The tracking fork servers of this test session live in a directory of its own
    (not the user's), and retire when the session ends (their forks finish first)."""
    from pipekit.tracking import forkserver

    directory = tmp_path_factory.mktemp("runtime")
    directory.chmod(0o700)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(forkserver.DIR_ENV, str(directory))
        yield directory
    for sock in directory.glob("*.sock"):
        forkserver.retire(sock)


@pytest.fixture
def fork_runtime(tmp_path):
    """A fork-server directory of this test's own (`PIPEKIT_RUNTIME_DIR`): its servers
    are this test's alone, and retire when it ends."""
    from pipekit.tracking import forkserver

    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o700)
    yield directory
    for sock in directory.glob("*.sock"):
        forkserver.retire(sock)


def fork_server(directory: Path) -> Any:
    """The fork server (a psutil.Process) serving a socket in `directory`, or None. Its
    forks have its command line too: the server is the one whose parent is not one."""
    import psutil

    found = {}
    for process in psutil.process_iter(["cmdline", "ppid", "status"]):
        line = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(
            arg.startswith(str(directory)) and arg.endswith(".sock") for arg in line[1:]
        ):
            found[process.pid] = process
    servers = [p for p in found.values() if p.info["ppid"] not in found]
    assert len(servers) <= 1, servers
    return servers[0] if servers else None


@pytest.fixture
def pipeline_from():
    return make


@pytest.fixture
def user_conf(tmp_path):
    """Write a user config dir: user_conf({"pipeline/x.yaml": {...}}) -> Path."""

    def write(files: dict[str, Any], root: Path | None = None) -> Path:
        root = root or tmp_path / "conf"
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
            path.write_text(text)
        return root

    return write


@pytest.fixture
def cli_env(tmp_path):
    """Environment for `pipekit` subprocesses: test stages importable, no tracking noise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Runs write mlflow.db, .pipekit/ and outputs/ into the working directory: use tmp_path."""
    monkeypatch.chdir(tmp_path)

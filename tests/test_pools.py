"""executor=processes starts its workers from a fork server (run/pools.py): they still see
the driver's environment as it is when the run starts, a user's Dask start method still
wins, and a worker still ends with its driver (tests/test_faults.py kills the driver)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import dask
import pytest
from conftest import make

from pipekit.run.pools import start_method


def test_workers_start_from_a_fork_server_unless_dask_is_told_otherwise():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        assert start_method().get_start_method() == "spawn"
    else:
        assert start_method().get_start_method() == "forkserver"
    with dask.config.set({"multiprocessing.context": "spawn"}):
        assert start_method().get_start_method() == "spawn"


def parent_pid() -> int:
    return os.getppid()


def test_a_users_start_method_runs_the_stages():
    p = make(
        {"where": {"_target_": "test_pools.parent_pid"}},
        executor={"scheduler": "processes", "num_workers": 1},
    )
    with dask.config.set({"multiprocessing.context": "spawn"}):
        assert p.run(progress=False)["where"] == os.getpid()  # spawned by the driver itself
    if "forkserver" in multiprocessing.get_all_start_methods():
        assert p.run(progress=False, force=True)["where"] != os.getpid()  # the fork server


SCRIPT = """
import os
import sys

import pipekit as pk


def env(name: str, tick: int = 0):
    return os.environ.get(name), os.getppid() == int(os.environ["DRIVER"])


def run(tick: int):
    p = pk.Pipeline.from_config({
        "name": "env",
        "stages": {
            "a": {"_target_": "envcheck.env", "params": {"name": "PIPEKIT_A", "tick": tick}},
            "b": {"_target_": "envcheck.env", "params": {"name": "PIPEKIT_B", "tick": tick}},
        },
        "executor": {"scheduler": "processes", "num_workers": 2},
    })
    result = p.run(progress=False)
    return result["a"], result["b"]


if __name__ == "__main__":
    os.environ["DRIVER"] = str(os.getpid())
    os.environ["PIPEKIT_A"] = "first"   # the fork server starts with this environment
    print(run(1))
    del os.environ["PIPEKIT_A"]
    os.environ["PIPEKIT_B"] = "later"
    print(run(2))
"""


@pytest.mark.skipif(
    "forkserver" not in multiprocessing.get_all_start_methods(), reason="no fork server here"
)
def test_workers_see_the_drivers_environment_of_each_run(tmp_path):
    (tmp_path / "envcheck.py").write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEKIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "envcheck.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    # workers are forks of the fork server, not children of the driver
    assert first == "(('first', False), (None, False))"
    assert second == "((None, False), ('later', False))"

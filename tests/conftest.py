"""Shared fixtures: build pipelines from dicts and write user config directories."""

from __future__ import annotations

import os
import subprocess
import sys
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

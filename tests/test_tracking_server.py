"""The example pipeline tracked by a real `mlflow server` (SQLite backend), checked over REST."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_pipekit

import pipekit as pk

requests = pytest.importorskip("requests")
pytest.importorskip("mlflow")

STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Stop the server and the workers it forked (its own process group)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1; stopped even when the test fails."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow) if mlflow.exists() else "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"mlflow server exited {process.returncode}:\n{log_path.read_text()}"
                    )
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"mlflow server not up after {STARTUP_SECONDS}s:\n{log_path.read_text()}"
                    )
                time.sleep(0.25)
            yield url
        finally:
            stop(process)


def api(url: str, path: str, **params) -> dict:
    response = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def search_runs(url: str, experiment_id: str, query: str) -> list[dict]:
    response = requests.post(
        f"{url}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": query, "max_results": 1000},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json().get("runs", [])


def tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("data", entity).get("tags", [])}


def test_example_tracked_by_a_real_server(mlflow_server, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    url = mlflow_server
    pipeline = pk.load(
        "cancer",
        overrides=[
            "executor=threads",
            "cache=off",
            "tracking=server",
            f"tracking.uri={url}",
            "stages.train.params.C=0.5",
        ],
    )
    result = pipeline.run(progress=False)
    printed = capfd.readouterr()  # the writer thread of a notebook run: quiet too
    for chatter in MLFLOW_CHATTER:
        assert chatter not in printed.out and chatter not in printed.err, chatter

    experiment = api(url, "experiments/get-by-name", experiment_name="cancer")["experiment"]
    runs = search_runs(
        url, experiment["experiment_id"], f"tags.`pipekit.run_id` = '{result.run_id}'"
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    assert len(parents) == 1
    parent = parents[0]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    assert tags(parent)["pipekit.pipeline"] == "cancer"
    assert "stages.train.params.C=0.5" in tags(parent)["pipekit.overrides"]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["train.C"] == "0.5"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["evaluate.roc_auc"] == pytest.approx(result["evaluate"]["roc_auc"])

    children = {tags(r)["pipekit.stage"]: r for r in runs if r is not parent}
    assert set(children) == set(pipeline.stages)
    assert {tags(r)["mlflow.parentRunId"] for r in children.values()} == {parent_id}
    assert {r["info"]["status"] for r in children.values()} == {"FINISHED"}
    evaluate = {m["key"]: m["value"] for m in children["evaluate"]["data"]["metrics"]}
    assert evaluate["accuracy"] == pytest.approx(result["evaluate"]["accuracy"])

    artifacts = api(url, "artifacts/list", run_id=parent_id)
    assert "config.yaml" in {f["path"] for f in artifacts.get("files", [])}

    versions = {}
    for name in ("cancer.features", "cancer.train"):
        found = api(url, "model-versions/search", filter=f"name='{name}'")["model_versions"]
        assert len(found) == 1
        versions[name] = found[0]
    train = versions["cancer.train"]
    assert train["run_id"] == children["train"]["info"]["run_id"]
    train_tags = {t["key"]: t["value"] for t in train["tags"]}
    assert train_tags["pipekit.parent_run_id"] == parent_id
    assert train_tags["pipekit.upstream.features"] == "cancer.features/1"
    champion = api(url, "registered-models/alias", name="cancer.train", alias="champion")
    assert champion["model_version"]["version"] == "1"

    chain = pk.lineage("cancer.train@champion", uri=url)
    assert [node.key for node in chain] == ["cancer.features/1", "cancer.train/1"]
    assert "RUNNING" not in {r["info"]["status"] for r in runs}


#: What MLflow itself prints or logs while pipekit logs and registers (none may show).
MLFLOW_CHATTER = (
    "View run",
    "View experiment",
    "\U0001f3c3",  # 🏃
    "\U0001f9ea",  # 🧪
    "Waiting up to",
    "Created version",
    "Registered model",
    "Successfully registered",
    "INFO mlflow",
    "WARNING mlflow",
)


def test_cli_run_is_quiet_and_links_to_the_training_view(mlflow_server, tmp_path, cli_env):
    from mlflow import MlflowClient

    url = mlflow_server
    proc = run_pipekit(
        "run",
        "pipeline=cancer",
        "executor=threads",
        "cache=off",
        "tracking=server",
        f"tracking.uri={url}",
        "stages.train.params.C=0.5",
        env=cli_env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for chatter in MLFLOW_CHATTER:
        assert chatter not in proc.stdout and chatter not in proc.stderr, chatter
    assert proc.stdout.splitlines()[-1].startswith("publish: ")  # metrics only on stdout

    experiment = api(url, "experiments/get-by-name", experiment_name="cancer")["experiment"]
    exp_id = experiment["experiment_id"]
    assert tags(experiment)["mlflow.experimentKind"] == "custom_model_development"
    parents = [
        r
        for r in search_runs(url, exp_id, "tags.`pipekit.pipeline` = 'cancer'")
        if "mlflow.parentRunId" not in tags(r)
    ]
    assert len(parents) == 1
    run_id = parents[0]["info"]["run_id"]
    assert parents[0]["info"]["run_name"] == "cancer C=0.5"
    view = "workflowType=machine_learning"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pipekit: tracked in MLflow run {run_id}: {url}/#/experiments/{exp_id}/runs/{run_id}"
        f"?{view} (experiment: {url}/#/experiments/{exp_id}/runs?{view})"
    )

    client = MlflowClient(url)  # the models: logged models, their versions point at them
    models = {m.name: m for m in client.search_logged_models([exp_id])}
    assert set(models) == {"features", "train"}
    for stage, model in models.items():
        assert str(model.status) == "READY"
        version = client.get_model_version(f"cancer.{stage}", "1")
        assert version.source == f"models:/{model.model_id}"
        assert model.tags["mlflow.modelVersions"] == (
            f'[{{"name": "cancer.{stage}", "version": 1}}]'
        )
    assert {m.key for m in models["train"].metrics} == {"accuracy", "f1", "roc_auc"}

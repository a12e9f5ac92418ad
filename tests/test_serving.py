"""Serving: the `serve` section validated like the training DAG; the inference DAG exported as
one MLflow model; `pipekit serve` answering real HTTP (MLflow's protocol) and swapping
versions under load without a failed request; `mlflow models serve` serving the same model;
batch prediction by Dask partitions equal to online, row for row.

Real parts throughout: the shipped `cancer` pipeline trained into a SQLite MLflow store,
servers started as subprocesses on 127.0.0.1, every wait bounded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import make, run_pipekit

import pipekit as pk
from pipekit import errors
from pipekit.examples.cancer import request_example

VALID_ROWS = 3
MAX_BODY = "64KB"  # test servers refuse bodies above this (413)


# --- the `serve` section: validated before anything runs -------------------------------------

TRAIN = {
    "data": {"_target_": "const"},
    "fit": {"_target_": "const", "model": True, "inputs": {"value": "data"}},
    "report": {"_target_": "const", "inputs": {"value": "fit"}},
}
SERVE = {
    "example": {"_target_": "core_stages.const", "params": {"value": [[1.0]]}},
    "stages": {
        "predict": {"model": "fit", "method": "predict", "input": "request"},
        "respond": {"_target_": "core_stages.add", "inputs": {"a": "predict"}},
    },
}


def serving(change):
    """SERVE with `change(serve_dict)` applied (a deep copy)."""
    serve = json.loads(json.dumps(SERVE))
    change(serve)
    return serve


def stage(name, **body):
    return lambda s: s["stages"].__setitem__(name, body)


# name -> (how to break the serve section, exception class, fragments of the message)
BAD_SERVE = {
    "model_typo": (
        stage("predict", model="fti", input="request"),
        errors.ServeConfigError,
        ["pipeline 't': serve stage 'predict' model 'fti' is not a model stage", "'fit'"],
    ),
    "model_without_model_true": (
        stage("predict", model="report", input="request"),
        errors.ServeConfigError,
        ["model 'report' is not a model stage", "no `model: true`", "model stages are fit"],
    ),
    "bad_method": (
        stage("predict", model="fit", method="predict_prob"),
        errors.ServeConfigError,
        ["serve stage 'predict' method 'predict_prob'", "did you mean 'predict_proba'"],
    ),
    "unknown_input": (
        lambda s: s["stages"]["respond"].__setitem__("inputs", {"a": "predcit"}),
        errors.UnknownStageError,
        ["serve stage 'respond' input 'a'", "unknown serve stage 'predcit'", "'predict'"],
    ),
    "cycle": (
        lambda s: s["stages"]["predict"].__setitem__("input", "respond"),
        errors.CycleError,
        ["serve cycle", "predict -> respond -> predict"],
    ),
    "self_edge": (
        lambda s: s["stages"]["predict"].__setitem__("input", "predict"),
        errors.SelfEdgeError,
        ["serve stage 'predict' input refers to the stage itself"],
    ),
    "both_kinds": (
        stage("predict", model="fit", _target_="core_stages.const"),
        errors.ServeConfigError,
        ["both 'model' and '_target_'"],
    ),
    "neither_kind": (
        stage("predict", input="request"),
        errors.ServeConfigError,
        ["needs 'model: <training stage>'", "'_target_'"],
    ),
    "stage_key_typo": (
        stage("predict", model="fit", mehtod="predict"),
        errors.ServeConfigError,
        ["unknown key 'mehtod'", "did you mean 'method'"],
    ),
    "inputs_on_model_stage": (
        stage("predict", model="fit", inputs={"X": "request"}),
        errors.ServeConfigError,
        ["unknown key 'inputs'", "takes one `input:`"],
    ),
    "section_key_typo": (
        lambda s: s.__setitem__("allias", "x"),
        errors.ServeConfigError,
        ["serve.allias is not a serve setting", "did you mean 'alias'"],
    ),
    "bad_version": (
        stage("predict", model="fit", version=-2),
        errors.ServeConfigError,
        ["serve stage 'predict' version", "a version number", "-2"],
    ),
    "two_versions_of_one_model": (
        lambda s: s["stages"].update(
            {
                "predict": {"model": "fit", "version": 1},
                "again": {"model": "fit", "version": 2, "input": "predict"},
                "respond": {"_target_": "core_stages.add", "inputs": {"a": "again"}},
            }
        ),
        errors.ServeConfigError,
        ["serve stage 'again' version 2", "one version of each model"],
    ),
    "bad_port": (
        lambda s: s.__setitem__("port", "http"),
        errors.ServeConfigError,
        ["serve.port must be an integer from 0 to 65535"],
    ),
    "bad_max_body": (
        lambda s: s.__setitem__("max_body", "lots"),
        errors.ServeConfigError,
        ["serve.max_body must be a size such as 10MB"],
    ),
    "unknown_output": (
        lambda s: s.__setitem__("output", "respnd"),
        errors.UnknownStageError,
        ["serve.output 'respnd' is not a serve stage", "did you mean 'respond'"],
    ),
    "two_ends": (
        lambda s: s["stages"].__setitem__("extra", {"model": "fit"}),
        errors.ServeConfigError,
        ["serve.output is not set and 2 serve stages end the DAG", "respond, extra"],
    ),
    "request_as_stage_name": (
        stage("request", model="fit"),
        errors.ServeConfigError,
        ["serve stage 'request'", "names the request rows"],
    ),
    "function_import": (
        lambda s: s["stages"]["respond"].__setitem__("_target_", "core_stages.no_such"),
        errors.TargetImportError,
        ["pipeline 't': serve stage 'respond' _target_ 'core_stages.no_such' cannot be imported"],
    ),
    "function_param": (
        lambda s: s["stages"]["respond"].__setitem__("params", {"bb": 1}),
        errors.UnknownArgumentError,
        ["pipeline 't': serve stage 'respond' param 'bb'", "did you mean 'b'"],
    ),
    "example_import": (
        lambda s: s["example"].__setitem__("_target_", "core_stages.nope"),
        errors.TargetImportError,
        ["pipeline 't': serve.example _target_ 'core_stages.nope' cannot be imported"],
    ),
    "not_a_mapping": (
        lambda s: s.__setitem__("stages", ["predict"]),
        errors.ServeConfigError,
        ["serve.stages must be a non-empty mapping"],
    ),
}


@pytest.mark.parametrize("case", BAD_SERVE)
def test_bad_serve_section_is_a_config_error(case):
    change, exc_class, fragments = BAD_SERVE[case]
    with pytest.raises(exc_class) as info:
        make(TRAIN, serve=serving(change)).validate()
    message = str(info.value)
    assert message.startswith("pipeline 't': "), message
    assert isinstance(info.value, errors.ConfigError) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_valid_serve_section_parses_in_run_order():
    from pipekit.core.serving import check_serve

    p = make(TRAIN, serve=SERVE).validate()
    spec = check_serve(p.spec)
    assert spec.order == ("predict", "respond") and spec.output == "respond"
    assert spec.models == {"fit": None} and spec.model_name == "t.serving"
    assert (spec.alias, spec.port, spec.max_body) == ("champion", 8000, 10 * 1024 * 1024)


def test_cli_validate_reports_a_serve_error_in_one_line(cli_env, tmp_path):
    proc = run_pipekit(
        "validate", "tracking=off", "cache=off", "serve.stages.proba.model=trian",
        env=cli_env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "pipekit: error: pipeline 'cancer': serve stage 'proba' model 'trian' is not a model "
        "stage (did you mean 'train'?); model stages are features, train (training stages "
        "with `model: true`)"
    )


# --- a trained store, exported once, shared by the tests below --------------------------------


@contextlib.contextmanager
def cwd(path: Path):
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The shipped `cancer` pipeline trained into its own SQLite store and exported (v1)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    overrides = ["cache=off", f"tracking.uri={uri}"]
    with cwd(root):
        p = pk.load("cancer", overrides=overrides)
        result = p.run(progress=False)
        assert result.status["publish"] == "done"
        exported = p.export()
    assert (exported.name, exported.version, exported.alias) == ("cancer.serving", "1", "champion")
    return {"root": root, "uri": uri, "overrides": overrides, "pipeline": p}


def client_for(uri):
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def model_info(client, name, version):
    """The MLmodel of a registered version, read from its local artifact directory
    (`get_model_info` would also look its logged model up in the process-wide store)."""
    from urllib.parse import urlparse

    uri = client.get_model_version_download_uri(name, str(version))
    return mlflow.models.Model.load(urlparse(uri).path)


def test_export_registers_one_model_with_signature_and_pins(store):
    client = client_for(store["uri"])
    version = client.get_model_version_by_alias("cancer.serving", "champion")
    assert str(version.version) == "1"
    assert version.tags["pipekit.upstream.train"] == "cancer.train/1"
    assert version.tags["pipekit.upstream.features"] == "cancer.features/1"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"  # the export's run is never left RUNNING
    # an MLflow 3 logged model of the export's run (the experiment's Models tab), which the
    # version points at, tagged with the pins like the version
    model_id = version.tags["pipekit.model_id"]
    assert model_id.startswith("m-") and version.source == f"models:/{model_id}"
    listed = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    logged = {m.model_id: m for m in listed}[model_id]
    assert (logged.name, logged.source_run_id, str(logged.status)) == (
        "serving",
        version.run_id,
        "READY",
    )
    assert logged.tags["pipekit.upstream.train"] == "cancer.train/1"
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    assert client.get_model_version_download_uri("cancer.serving", "1") == logged.artifact_location
    info = model_info(client, "cancer.serving", 1)
    inputs = info.signature.inputs.input_names()
    assert inputs == list(request_example().columns)  # the 30 features, from serve.example
    assert info.signature.outputs.input_names() == ["diagnosis", "probability"]
    record = json.loads(Path(client.download_artifacts(version.run_id, "serving.json")).read_text())
    assert record["stages"] == {"features": "cancer.features/1", "train": "cancer.train/1"}
    # pk.lineage walks through the serving version to the stage versions and their runs
    found = pk.lineage("cancer.serving", "champion", uri=store["uri"])
    assert {"cancer.train/1", "cancer.features/1"} <= set(found.nodes)


def test_stage_models_are_logged_with_signature_and_input_example(store):
    """Each model stage gets the input the inference DAG gives it for serve.example."""
    client = client_for(store["uri"])
    scaler, model = (model_info(client, name, 1) for name in ("cancer.features", "cancer.train"))
    assert scaler.signature.inputs.input_names() == list(request_example().columns)
    assert scaler.saved_input_example_info["type"] == "dataframe"
    assert model.signature is not None and model.saved_input_example_info["type"] == "ndarray"
    assert tuple(model.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 30)


def test_export_errors_name_the_fix(tmp_path, cli_env, store):
    off = run_pipekit("export", "mlflow", "tracking=off", env=cli_env, cwd=tmp_path)
    assert off.returncode == 2 and "Traceback" not in off.stderr, off.stderr
    assert off.stderr.startswith("pipekit: error: pipeline 'cancer': tracking is off, but ")
    empty = pk.load("cancer", overrides=["cache=off", f"tracking.uri=sqlite:///{tmp_path}/new.db"])
    with pytest.raises(errors.ServingError, match="no MLflow store at"):
        empty.export()
    assert not (tmp_path / "new.db").exists()  # nothing created for a failed export
    aliased = store["pipeline"].with_overrides(["serve.stages.proba.version=nosuch"])
    with pytest.raises(errors.ServingError) as info:
        aliased.export()
    assert "serve stage 'proba' version 'nosuch': registered model 'cancer.train' has no " in (
        str(info.value)
    )
    assert "(aliases: champion)" in str(info.value)


def test_pins_trained_apart_are_refused():
    from pipekit.core.serving import check_serve
    from pipekit.serve.registry import Pin, _check_together

    serve = check_serve(pk.load("cancer", overrides=["tracking=off"]).spec)
    users = {"features": "scale", "train": "proba"}
    pins = {
        "features": Pin("features", "cancer.features", "2", "r2", "@champion"),
        "train": Pin("train", "cancer.train", "1", "r1", "version 1", {"features": "1"}),
    }
    with pytest.raises(errors.ServingError, match=r"trained with cancer\.features v1, but serve"):
        _check_together(serve, users, pins)


# --- online: `pipekit serve` as a real server ----------------------------------------------


class Served:
    """A server subprocess, its URL read from its first line (bounded waits throughout)."""

    def __init__(self, args, env, cwd, log: Path, pattern=r"at (http://\S+) \("):
        self.log = log
        self.proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log.open("w"),
            start_new_session=True,
        )  # fmt: skip
        self.url = self._wait_for(pattern)

    def _wait_for(self, pattern: str, timeout: float = 150.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited {self.proc.returncode}: {self.log.read_text()}"
                )
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"no server line in {timeout} s: {self.log.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and children
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def pipekit_serve(store, tmp_path, cli_env, *extra, name="serve"):
    args = [sys.executable, "-m", "pipekit.cli", "serve", *store["overrides"]]
    args += ["serve.port=0", f"serve.max_body={MAX_BODY}", *extra]
    return Served(args, cli_env, tmp_path, tmp_path / f"{name}.log")


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """`pipekit serve` following @champion, polling the registry every 0.2 s."""
    tmp = tmp_path_factory.mktemp("server")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    served = pipekit_serve(store, tmp, env, "serve.poll_interval=0.2")
    wait_ready(served.url)
    yield served
    served.stop()
    assert "Traceback" not in served.log.read_text()


def status(server):
    return requests.get(f"{server.url}/version", timeout=10).json()


def wait_ready(url, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url}/ping never answered 200")


def rows(n=VALID_ROWS, offset=0):
    return request_example(rows=n + offset).iloc[offset:].reset_index(drop=True)


def split_payload(frame):
    return {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}}


def post(url, timeout=30, **kwargs):
    return requests.post(f"{url}/invocations", timeout=timeout, **kwargs)


def malformed():
    """name -> request kwargs of each kind of bad request the server must refuse with a 4xx."""
    good = rows(1)
    record = good.to_dict(orient="records")[0]
    return {
        "bad_json": {"data": b'{"dataframe_split": ', "headers": JSON},
        "empty_body": {"data": b"", "headers": JSON},
        "wrong_columns": {"json": {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}},
        "wrong_types": {"json": {"dataframe_records": [{**record, "mean radius": "big"}]}},
        "missing_value": {"json": {"dataframe_records": [{**record, "mean radius": None}]}},
        "oversized": {"data": b"[" + b"1," * 40_000 + b"1]", "headers": JSON},
        "not_an_object": {"json": [1, 2, 3]},
        "two_formats": {"json": {"dataframe_records": [record], "instances": [record]}},
        "no_content_type": {"data": b"{}"},
        "unknown_content_type": {"data": b"<rows/>", "headers": {"Content-Type": "text/xml"}},
        "not_utf8": {"data": b"\xff\xfe{", "headers": JSON},
        "ragged_split": {
            "json": {"dataframe_split": {"columns": list(good.columns), "data": [[1]]}}
        },
    }


JSON = {"Content-Type": "application/json"}


def test_server_answers_mlflow_payloads(server):
    frame = rows()
    expected = None
    for payload in (
        {"json": split_payload(frame)},
        {"json": {"dataframe_records": frame.to_dict(orient="records")}},
        {"json": {"inputs": frame.to_dict(orient="list")}},
        {"json": {"instances": frame.to_dict(orient="records")}},
        {"data": frame.to_csv(index=False), "headers": {"Content-Type": "text/csv"}},
    ):
        answer = post(server.url, **payload)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Pipekit-Serving-Version"] == status(server)["version"]
        predictions = answer.json()["predictions"]
        assert len(predictions) == VALID_ROWS and set(predictions[0]) == {
            "diagnosis",
            "probability",
        }
        expected = expected or predictions
        assert predictions == expected  # every format, the same answer
    for path in ("/ping", "/health"):
        assert requests.get(server.url + path, timeout=10).status_code == 200
    version = status(server)
    assert version["model"] == "cancer.serving" and version["following"] == "@champion"
    assert version["stages"] == {"features": "cancer.features/1", "train": "cancer.train/1"}


@pytest.mark.parametrize("kind", list(malformed()))
def test_malformed_request_gets_4xx_with_a_reason(server, kind):
    answer = post(server.url, **malformed()[kind])
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    body = answer.json()
    assert body["error_code"] and body["message"], body
    expected = {"oversized": 413, "no_content_type": 415, "unknown_content_type": 415}
    assert answer.status_code == expected.get(kind, 400), body
    assert post(server.url, json=split_payload(rows())).status_code == 200  # still answering


def test_reasons_say_what_is_wrong(server):
    def message(kind):
        return post(server.url, **malformed()[kind]).json()["message"]

    assert "Model is missing inputs ['mean radius'" in message("wrong_columns")
    assert "could not convert string to float: 'big'" in message("wrong_types")
    assert "valid JSON" in message("bad_json")
    assert "empty request body" in message("empty_body")
    assert "larger than the limit of 64.0 KB (serve.max_body)" in message("oversized")


def test_mlflow_models_serve_serves_the_export_unchanged(server, store, tmp_path):
    """`mlflow models serve -m models:/cancer.serving/1 --env-manager local` answers the same."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store["uri"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cancer.serving/1"]
    args += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "mlflow-serve.log"
    proc = subprocess.Popen(
        args, env=env, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=150)
        payload = split_payload(rows())
        theirs, ours = post(url, json=payload), post(server.url, json=payload)
        assert theirs.status_code == 200, (theirs.text, log.read_text())
        assert theirs.json() == ours.json()
        refused = post(url, **malformed()["wrong_columns"])
        assert refused.status_code == 400 and "missing inputs" in refused.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# --- hot reload under load --------------------------------------------------------------------


def test_alias_swap_under_load_fails_no_request(server, store):
    """2,000+ requests from 4 clients, 10% malformed; @champion moves to a new serving version
    in the middle. Valid requests all answer 200 (from the old version, then the new one),
    malformed ones all get a 4xx, and no request gets a 5xx."""
    before = status(server)
    client = client_for(store["uri"])
    fresh = store["pipeline"].export(alias=False)  # registered now, served once @champion moves
    assert fresh.version != before["version"]
    url = f"{server.url}/invocations"
    bad = list(malformed().items())
    good = [json.dumps(split_payload(rows(n, at))).encode() for n, at in ((1, 0), (3, 2), (5, 7))]
    counter, lock, results = itertools.count(), threading.Lock(), []
    stop_at, enough = time.monotonic() + 150, threading.Event()  # bounded in time and count

    def load():
        with requests.Session() as session:
            while not enough.is_set() and time.monotonic() < stop_at:
                i = next(counter)
                if i >= 8000:
                    return
                if i % 10 == 9:
                    kind, kwargs = bad[(i // 10) % len(bad)]
                    answer = session.post(url, timeout=30, **kwargs)
                    outcome = (False, answer.status_code, kind)
                else:
                    answer = session.post(url, data=good[i % 3], headers=JSON, timeout=30)
                    served = answer.headers.get("X-Pipekit-Serving-Version", "")
                    outcome = (True, answer.status_code, served)
                with lock:
                    results.append(outcome)
                    moved = sum(1 for ok, _, v in results if ok and v == fresh.version)
                    if len(results) >= 2000 and moved >= 50:
                        enough.set()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(load) for _ in range(4)]
        while len(results) < 600 and time.monotonic() < stop_at:
            time.sleep(0.02)
        client.set_registered_model_alias("cancer.serving", "champion", fresh.version)
        for done in clients:
            done.result(timeout=200)
    valid = [(code, version) for ok, code, version in results if ok]
    invalid = [(code, kind) for ok, code, kind in results if not ok]
    assert len(results) >= 2000 and len(invalid) >= 200
    assert [code for code, _ in valid if code != 200] == []  # no failed valid request
    assert [(code, k) for code, k in invalid if not 400 <= code < 500] == []  # never a 5xx
    assert {version for _, version in valid} == {before["version"], fresh.version}
    after = status(server)
    assert (after["version"], after["chosen"]) == (fresh.version, "@champion")
    assert after["swaps"] == before["swaps"] + 1 and after["last_error"] is None


def test_a_version_that_cannot_load_is_skipped_and_the_old_one_answers(server, store):
    """@champion moved to a version whose files are gone: the server keeps answering with
    the version it has, says why in /version, and follows again when the alias moves back."""
    client = client_for(store["uri"])
    before = status(server)
    broken = client.create_model_version(
        "cancer.serving", f"file://{store['root']}/no-such-model", run_id=None
    )
    client.set_registered_model_alias("cancer.serving", "champion", broken.version)
    try:
        deadline = time.monotonic() + 60
        while status(server)["last_error"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        now = status(server)
        assert now["last_error"] and now["last_error"].startswith(f"v{broken.version}: ")
        assert now["version"] == before["version"]
        answer = post(server.url, json=split_payload(rows()))
        assert answer.status_code == 200
        assert answer.headers["X-Pipekit-Serving-Version"] == before["version"]
    finally:
        client.set_registered_model_alias("cancer.serving", "champion", before["version"])
        client.delete_model_version("cancer.serving", broken.version)


def test_serving_without_an_export_says_so(store):
    from pipekit.serve.server import Server

    wine = pk.load("wine", overrides=["cache=off", f"tracking.uri={store['uri']}"])
    with pytest.raises(errors.ServingError, match=r"'wine\.serving' has no versions to serve; "):
        Server.for_pipeline(wine.spec, port=0).start()


# --- batch: by Dask partitions, equal to online ------------------------------------------------


def scoring_input(tmp_path, n=240):
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).data.head(n).reset_index(drop=True)
    frame.insert(0, "id", range(n))
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return frame, path


def test_batch_equals_online_row_for_row(server, store, tmp_path, cli_env):
    frame, path = scoring_input(tmp_path)
    out = tmp_path / "scores.parquet"
    version = status(server)["version"]
    proc = run_pipekit(
        "predict", f"input={path}", f"output={out}", *store["overrides"], "executor=processes",
        "--version", version, "--keep", "id", "--partition-size", "16k",
        env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"scored 240 rows with cancer.serving v{version} (version {version})" in proc.stdout
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) > 2  # partitions, scored in parallel worker processes
    batch = pd.read_parquet(out)
    assert list(batch.columns) == ["id", "diagnosis", "probability"]
    assert batch["id"].tolist() == list(range(240))  # input order
    online = []
    features = frame.drop(columns=["id"])
    for start in range(0, len(features), 60):
        answer = post(server.url, json=split_payload(features.iloc[start : start + 60]))
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Pipekit-Serving-Version"] == version
        online.extend(answer.json()["predictions"])
    online = pd.DataFrame(online)
    assert batch["diagnosis"].tolist() == online["diagnosis"].tolist()
    np.testing.assert_allclose(batch["probability"], online["probability"], rtol=1e-12, atol=0)


def test_batch_from_parquet_threads_and_overwrite_rules(store, tmp_path):
    from pipekit.core.serving import check_serve
    from pipekit.serve.batch import MARKER, predict

    serve = check_serve(store["pipeline"].spec)
    frame, _ = scoring_input(tmp_path, 100)
    source = tmp_path / "rows.parquet"
    frame.drop(columns=["id"]).to_parquet(source)
    out = tmp_path / "scored"
    done = predict(store["uri"], serve, source, out, version="1", scheduler="threads")
    assert done.rows == 100 and (out / MARKER).is_file()
    first = pd.read_parquet(out)
    with pytest.raises(errors.ServingError, match="pass --overwrite"):
        predict(store["uri"], serve, source, out, version="1")
    predict(store["uri"], serve, source, out, version="1", overwrite=True)
    pd.testing.assert_frame_equal(pd.read_parquet(out), first)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.txt").write_text("precious")
    with pytest.raises(errors.ServingError, match="not a pipekit prediction directory"):
        predict(store["uri"], serve, source, foreign, version="1", overwrite=True)
    assert (foreign / "chapter1.txt").read_text() == "precious"
    bad = tmp_path / "bad.csv"
    frame.drop(columns=["mean radius"]).to_csv(bad, index=False)
    with pytest.raises(errors.ServingError, match="missing inputs \\['mean radius'\\]"):
        predict(store["uri"], serve, bad, tmp_path / "never", version="1")
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no half output


# --- export on promote ---------------------------------------------------------------------------


def test_export_on_promote_follows_a_retrain(store):
    """A run whose promotion fires exports on its own; nothing new to serve, nothing exported."""
    client = client_for(store["uri"])
    p = store["pipeline"].with_overrides(
        ["serve.export_on_promote=true", "stages.train.params.C=0.3", "cache=local"]
    )
    with cwd(store["root"]):
        first = p.run(progress=False)
        again = p.run(progress=False)  # all cached: the same stage versions
    champion = client.get_model_version_by_alias("cancer.serving", "champion")
    assert first.tracking["serving_version"] == f"cancer.serving/{champion.version}"
    assert again.tracking["serving_version"] == first.tracking["serving_version"]
    train = client.get_model_version_by_alias("cancer.train", "champion")
    assert champion.tags["pipekit.upstream.train"] == f"cancer.train/{train.version}"
    assert str(train.version) != "1"  # the retrained model, C=0.3


def test_show_draws_the_serve_dag_beside_the_training_dag(cli_env, tmp_path):
    """`pipekit show` lists the inference DAG after the training DAG, and the drawing puts
    it in its own box with a dotted edge from each training stage whose model it applies."""
    text = run_pipekit("show", "tracking=off", env=cli_env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    serve_part = text.stdout.split("serve 'cancer.serving' (3 stages)", 1)[1]
    assert "proba    model of train.predict_proba" in serve_part
    assert "input <- scale" in serve_part
    dot = run_pipekit("show", "--format", "dot", "tracking=off", env=cli_env, cwd=tmp_path)
    assert dot.returncode == 0, dot.stderr
    assert 'subgraph "cluster_serve"' in dot.stdout
    assert '"train" -> "serve:proba" [style=dotted' in dot.stdout
    assert '"serve:request" -> "serve:scale"' in dot.stdout
    svg = run_pipekit("show", "--format", "svg", "tracking=off", env=cli_env, cwd=tmp_path)
    assert svg.returncode == 0 and "<title>serve:respond</title>" in svg.stdout

"""MLflow tracking against a real SQLite store: run tree, models, lineage, failure states."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import run_pipekit

import pipekit as pk
from pipekit.cli import main
from pipekit.core.events import RunInfo, StageEvent
from pipekit.errors import StageError, TrackingConfigError, TrackingError
from pipekit.tracking.observer import MlflowObserver, config_hash, flatten_params, git_commit

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

# --- stage functions (importable as test_tracking.<name>) -------------------------------


def meet(directory: str, me: str, other: str, value: int) -> dict:
    """Returns only while stage `other` runs at the same time, so both overlap for sure."""
    from core_stages import rendezvous

    rendezvous(directory, me, other)
    time.sleep(0.05)
    return {"value": value, "double": 2 * value}


def interrupt(x=None):
    raise KeyboardInterrupt


def ctrl_c(x=None):
    """What a user's Ctrl-C does: SIGINT to the process while this stage runs."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    return 1


class Doubler:
    """A picklable non-sklearn model: logged through the pyfunc wrapper."""

    def __init__(self, factor: float):
        self.factor = factor

    def predict(self, rows):
        return [self.factor * r for r in rows]


def make_doubler(factor: float = 2.0) -> Doubler:
    return Doubler(factor)


def use_doubler(model: Doubler) -> dict:
    return {"first": model.predict([1.0])[0]}


# --- helpers ----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store in tmp_path, which is also the cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path}/mlflow.db"


def cancer(uri: str, *more: str, executor: str = "sync") -> pk.Pipeline:
    return pk.load(
        "cancer",
        overrides=[
            f"executor={executor}",
            "tracking=local",
            f"tracking.uri={uri}",
            "cache=off",
            *more,
        ],
    )


def tracked(stages: dict, uri: str, name: str = "t", executor: str = "sync") -> pk.Pipeline:
    return pk.Pipeline.from_config(
        {
            "name": name,
            "stages": stages,
            "executor": {"scheduler": executor},
            "tracking": {"backend": "local", "uri": uri},
        }
    )


def runs_of(uri: str, experiment: str, run_id: str):
    """(parent, {stage: nested run}) of the pipekit run `run_id`."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`pipekit.run_id` = '{run_id}'", max_results=1000
    )
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.data.tags for r in found]
    parent = parents[0]
    children = {r.data.tags["pipekit.stage"]: r for r in found if r is not parent}
    return parent, children


def all_statuses(uri: str) -> set[str]:
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.status for r in client.search_runs(exps, max_results=5000)}


# --- the run tree -----------------------------------------------------------------------


def test_example_logs_run_tree_models_and_lineage(store):
    pipeline = cancer(store, "stages.train.params.C=0.5", executor="threads")
    result = pipeline.run(progress=False)
    parent, children = runs_of(store, "cancer", result.run_id)

    assert parent.info.status == "FINISHED"
    assert result.tracking == {
        "mlflow_uri": store,
        "mlflow_experiment_id": parent.info.experiment_id,
        "mlflow_run_id": parent.info.run_id,
    }
    tags = parent.data.tags
    assert tags["pipekit.pipeline"] == "cancer"
    assert tags["pipekit.config_hash"] == config_hash(pipeline.config)
    assert "stages.train.params.C=0.5" in tags["pipekit.overrides"]
    assert tags["mlflow.runName"] == "cancer C=0.5"  # executor, tracking, cache: not named
    assert "mlflow.source.git.commit" not in tags  # tmp_path is not a repository
    assert parent.data.params["train.C"] == "0.5"
    assert parent.data.params["split.test_size"] == "0.25"
    assert parent.data.metrics["evaluate.roc_auc"] == pytest.approx(result["evaluate"]["roc_auc"])
    assert "train.duration_s" in parent.data.metrics

    assert set(children) == set(pipeline.stages)
    for stage, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["mlflow.runName"] == stage
        assert child.info.status == "FINISHED"
        assert "duration_s" in child.data.metrics
    assert children["train"].data.params == {
        "train.C": "0.5",
        "train.max_iter": "1000",
        "train.seed": "42",
    }
    assert children["evaluate"].data.metrics["f1"] == pytest.approx(result["evaluate"]["f1"])
    assert children["combine"].data.params == {}

    client = MlflowClient(store)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "config.yaml" in artifacts
    if importlib.util.find_spec("pipekit.viz") and shutil.which("dot"):
        assert "dag.svg" in artifacts
    config = yaml.safe_load(
        Path(client.download_artifacts(parent.info.run_id, "config.yaml")).read_text()
    )
    assert config["stages"]["train"]["params"]["C"] == 0.5

    features = client.get_model_version("cancer.features", "1")
    train = client.get_model_version("cancer.train", "1")
    assert train.run_id == children["train"].info.run_id
    assert train.tags["pipekit.parent_run_id"] == parent.info.run_id
    assert train.tags["pipekit.config_hash"] == tags["pipekit.config_hash"]
    assert train.tags["pipekit.upstream.features"] == "cancer.features/1"
    assert train.tags["pipekit.flavor"] == "sklearn"
    assert "pipekit.upstream.features" not in features.tags
    assert children["evaluate"].data.tags["pipekit.upstream.train"] == "cancer.train/1"
    assert children["train"].data.tags["pipekit.model_version"] == "cancer.train/1"

    # publish passed: both upstream model versions carry the alias; serving can load them
    assert client.get_model_version_by_alias("cancer.train", "champion").version == 1
    assert client.get_model_version_by_alias("cancer.features", "champion").version == 1
    assert (
        "@champion: cancer.features/1, cancer.train/1"
        in children["publish"].data.tags["pipekit.promoted"]
    )
    model = mlflow.sklearn.load_model("models:/cancer.train@champion")
    assert model.get_params()["C"] == 0.5

    # a second run is a new version with its own lineage
    second = cancer(store).run(progress=False)
    chain = pk.lineage("cancer.train", uri=store)
    assert chain.root == "cancer.train/2"
    assert [n.key for n in chain] == ["cancer.features/2", "cancer.train/2"]
    assert (
        chain["cancer.train"].parent_run_id
        == runs_of(store, "cancer", second.run_id)[0].info.run_id
    )
    assert chain["cancer.train"].aliases == ("champion",)
    assert chain.edges() == [("cancer.features/2", "cancer.train/2")]
    old = pk.lineage("cancer.train", 1, uri=store)
    assert [n.key for n in old] == ["cancer.features/1", "cancer.train/1"]
    assert old.to_dict()["versions"][1]["upstream"] == ["cancer.features/1"]
    drawing = old.draw()
    assert "cancer.features/1" in drawing.source and "->" in drawing.source
    assert all_statuses(store) == {"FINISHED"}


def test_pyfunc_wrapper_for_other_picklable_models(store):
    pipeline = tracked(
        {
            "fit": {
                "_target_": "test_tracking.make_doubler",
                "params": {"factor": 3.0},
                "model": True,
            },
            "use": {"_target_": "test_tracking.use_doubler", "inputs": {"model": "fit"}},
        },
        store,
        name="dbl",
    )
    pipeline.run(progress=False)
    version = MlflowClient(store).get_model_version("dbl.fit", "1")
    assert version.tags["pipekit.flavor"] == "pyfunc"
    with warnings.catch_warnings():  # the wrapper opts out of MLflow's type-hint check
        warnings.simplefilter("error", UserWarning)
        loaded = mlflow.pyfunc.load_model("models:/dbl.fit/1")
    assert list(loaded.predict([1.0, 2.0])) == [3.0, 6.0]


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_parallel_stages_log_into_their_own_runs(store, tmp_path, executor):
    meeting = tmp_path / "meet"
    meeting.mkdir()
    stages = {
        name: {
            "_target_": "test_tracking.meet",
            "params": {"directory": str(meeting), "me": name, "other": other, "value": value},
            "metrics": ["value", "double"],
        }
        for name, other, value in (("left", "right", 1), ("right", "left", 2))
    }
    result = tracked(stages, store, name="par", executor=executor).run(progress=False)
    _, children = runs_of(store, "par", result.run_id)
    for name, value in (("left", 1), ("right", 2)):
        run = children[name]
        assert run.data.params[f"{name}.value"] == str(value)
        assert not any(
            key.startswith(("left.", "right.")) and not key.startswith(name)
            for key in run.data.params
        )
        assert run.data.metrics["value"] == value and run.data.metrics["double"] == 2 * value
        assert run.data.tags["mlflow.runName"] == name


# --- failure states ---------------------------------------------------------------------


def test_failed_stage_ends_nested_and_parent_runs_failed(store):
    pipeline = cancer(store, "stages.publish.params.threshold=1.01")
    with pytest.raises(StageError, match="stage 'publish' failed: PublishRejected"):
        pipeline.run(progress=False)
    result = pipeline.last_result
    parent, children = runs_of(store, "cancer", result.run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["pipekit.failed_stages"] == "publish"
    publish = children["publish"]
    assert publish.info.status == "FAILED"
    assert publish.data.tags["pipekit.error"].startswith("PublishRejected: roc_auc=")
    client = MlflowClient(store)
    trace = Path(client.download_artifacts(publish.info.run_id, "traceback.txt")).read_text()
    assert "PublishRejected" in trace and "Traceback" in trace
    assert children["train"].info.status == "FINISHED"
    # nothing approved: no alias
    assert client.get_registered_model("cancer.train").aliases == {}
    assert "RUNNING" not in all_statuses(store)


def test_ctrl_c_ends_runs_killed(store):
    pipeline = tracked(
        {
            "first": {"_target_": "core_stages.const", "params": {"value": 1}},
            "stop": {"_target_": "test_tracking.interrupt", "inputs": {"x": "first"}},
        },
        store,
        name="kill",
    )
    observer = MlflowObserver(store, experiment="kill")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(progress=False, observers=[observer])
    client = MlflowClient(store)
    parent = client.get_run(observer.parent_run_id)
    assert parent.info.status == "KILLED"
    assert client.get_run(observer.stage_runs["stop"]).info.status == "KILLED"
    assert client.get_run(observer.stage_runs["first"]).info.status == "FINISHED"
    assert all_statuses(store) == {"FINISHED", "KILLED"}


def odd_names(**kwargs) -> dict:
    return {"acc@top:1": 0.5, "ok": 1.0}


def test_keys_mlflow_rejects_are_cleaned(store):
    pipeline = tracked(
        {"s": {"_target_": "test_tracking.odd_names", "params": {"opt": {"lr(init)": 0.1}}}},
        store,
        name="odd",
    )
    result = pipeline.run(progress=False)
    parent, children = runs_of(store, "odd", result.run_id)
    assert children["s"].data.params == {"s.opt.lr_init_": "0.1"}
    assert children["s"].data.metrics["acc_top:1"] == 0.5
    assert parent.data.metrics["s.acc_top:1"] == 0.5
    assert children["s"].info.status == "FINISHED"


def test_real_sigint_with_the_threads_executor_ends_runs_killed(store):
    pipeline = tracked(
        {
            "first": {"_target_": "core_stages.const"},
            "stop": {"_target_": "test_tracking.ctrl_c", "inputs": {"x": "first"}},
        },
        store,
        name="sigint",
        executor="threads",
    )
    observer = MlflowObserver(store, experiment="sigint")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(progress=False, observers=[observer])
    client = MlflowClient(store)
    assert client.get_run(observer.parent_run_id).info.status == "KILLED"
    stop = client.get_run(observer.stage_runs["stop"])
    assert stop.info.status == "KILLED"
    assert stop.data.tags["pipekit.error"] == "interrupted (Ctrl-C)"
    assert "RUNNING" not in all_statuses(store)


def test_skipped_stages_get_no_run_and_nothing_stays_running(store):
    pipeline = tracked(
        {
            "bad": {"_target_": "core_stages.boom", "params": {"message": "no data"}},
            "after": {"_target_": "core_stages.add", "inputs": {"a": "bad"}},
            "fine": {"_target_": "core_stages.const"},
        },
        store,
        name="skip",
    )
    result = pipeline.run(progress=False, raise_on_failure=False)
    parent, children = runs_of(store, "skip", result.run_id)
    assert set(children) == {"bad", "fine"}
    assert parent.data.tags["pipekit.skipped_stages"] == "after"
    assert children["bad"].data.tags["pipekit.error"] == "ValueError: no data"
    assert parent.info.status == "FAILED"
    assert "RUNNING" not in all_statuses(store)


def test_unreachable_server_warns_and_the_pipeline_still_runs(tmp_path, monkeypatch, caplog):
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pipeline = pk.Pipeline.from_config(
        {"name": "down", "stages": {"a": {"_target_": "core_stages.const"}}}
    )
    observer = MlflowObserver(f"http://127.0.0.1:{port}")
    with caplog.at_level("WARNING", logger="pipekit.tracking"):
        result = pipeline.run(progress=False, observers=[observer])
    assert result.ok
    assert observer.parent_run_id is None
    assert f"MLflow server http://127.0.0.1:{port} is unreachable" in observer.failures[0]
    assert "is unreachable" in caplog.text


# --- cache contract ---------------------------------------------------------------------


def test_cache_hits_link_to_the_version_their_entry_produced(store):
    """A cached model stage links to the version registered from the same cache entry
    (found by its `pipekit.cache_key` tag); an entry no version came from is registered."""
    from sklearn.preprocessing import StandardScaler

    from pipekit.core.result import RunResult

    pipeline = tracked(
        {"fit": {"_target_": "core_stages.const", "params": {"value": 1}, "model": True}},
        store,
        "c",
    )
    model = StandardScaler().fit([[0.0], [1.0]])
    loads = []

    def load():
        loads.append(1)
        return model

    def run(state: str, meta: dict) -> MlflowObserver:
        observer = MlflowObserver(store, experiment="c")
        assert observer.wants_outputs is False  # tracking never makes a run load outputs
        info = RunInfo(pipeline.spec, pipeline.graph, ("fit",), "sync", f"run-{state}", time.time())
        observer.run_started(info)
        if state == "done":
            observer.stage_changed(StageEvent("fit", "running", time.perf_counter()))
        output = model if state == "done" else None
        observer.stage_changed(
            StageEvent("fit", state, time.perf_counter(), 0.1, output=output, meta=meta)
        )
        observer.run_finished(info, RunResult("c", {}, {"fit": state}, run_id=info.run_id))
        return observer

    first = run("done", {"cache_key": "k1"})
    client = MlflowClient(store)
    registered = client.get_model_version("c.fit", "1")
    assert registered.tags["pipekit.cache_key"] == "k1"

    hit = run("cached", {"cache_key": "k1", "manifest": {}, "load": load})
    tags = client.get_run(hit.stage_runs["fit"]).data.tags
    assert tags["pipekit.cache_hit"] == "true"
    assert tags["pipekit.cache_source_run"] == first.stage_runs["fit"]
    assert tags["pipekit.model_version"] == "c.fit/1"
    assert [str(v.version) for v in client.search_model_versions("name='c.fit'")] == ["1"]
    assert loads == []  # the version existed: the cached output was never read

    # a hit whose entry produced no version (tracked elsewhere or not at all) registers one
    bare = run("cached", {"cache_key": "k2", "manifest": {}, "load": load})
    assert bare.versions["fit"] == ("c.fit", "2") and loads == [1]
    assert "RUNNING" not in all_statuses(store)


# --- settings and errors ----------------------------------------------------------------


def test_unknown_backend_is_a_config_error_before_anything_runs(store):
    pipeline = cancer(store, "tracking.backend=lcoal")
    with pytest.raises(
        TrackingConfigError, match=r"tracking.backend 'lcoal' is unknown \(did you mean 'local'\?\)"
    ):
        pipeline.run(progress=False)
    assert pipeline.last_result is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tracking=server", "tracking.uri=sqlite:///x.db"], "is not a server URI"),
        (["tracking.uri=http://127.0.0.1:5000"], "use `tracking=server tracking.uri=http://"),
        (
            ["+tracking.experimnt=x"],
            "tracking.experimnt is not a tracking setting (did you mean 'experiment'?)",
        ),
        (["tracking.wal=maybe"], "tracking.wal must be true or false"),
    ],
)
def test_bad_tracking_settings_name_the_key(store, overrides, message):
    with pytest.raises(TrackingConfigError, match="pipeline 'cancer'") as caught:
        cancer(store, *overrides).run(progress=False)
    assert message in str(caught.value)


def test_off_in_any_spelling_tracks_nothing(tmp_path, monkeypatch):
    from pipekit.tracking.observer import observer_from_config

    monkeypatch.chdir(tmp_path)
    pipeline = pk.load("cancer", overrides=["tracking=off"])
    for section in ({"backend": "off"}, {"backend": False}, {"backend": "local", "enabled": False}):
        assert observer_from_config(pipeline.name, section) is None
    pipeline.run(progress=False, targets=["collect_a"])
    assert not (tmp_path / "mlflow.db").exists()


def test_local_store_is_resolved_against_the_cwd_of_the_run(tmp_path, monkeypatch):
    from pipekit.tracking.settings import settings_from_config

    monkeypatch.chdir(tmp_path)
    settings = settings_from_config("p", {"backend": "local", "uri": "sqlite:///mlflow.db"})
    assert settings.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert settings.artifacts == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert settings.experiment == "p"


def test_server_uri_comes_from_config_or_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert pk.load("cancer", overrides=["tracking=server"]).config["tracking"]["uri"] == (
        "http://tracking.example:5000"
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert pk.load("cancer", overrides=["tracking=server"]).config["tracking"]["uri"] == (
        "http://127.0.0.1:5000"
    )


def test_experiment_name_override_and_git_commit(store, tmp_path):
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text(sha)
    result = cancer(store, "tracking.experiment=mine", "~stages.publish").run(progress=False)
    parent, _ = runs_of(store, "mine", result.run_id)
    assert parent.data.tags["pipekit.pipeline"] == "cancer"
    assert parent.data.tags["mlflow.source.git.commit"] == sha


def locked() -> dict:
    import threading

    return {"lock": threading.Lock()}


def test_unpicklable_model_output_is_tagged_and_the_run_still_ends(store):
    pipeline = tracked({"m": {"_target_": "test_tracking.locked", "model": True}}, store, "lock")
    observer = MlflowObserver(store, experiment="lock")
    pipeline.run(progress=False, observers=[observer])
    run = MlflowClient(store).get_run(observer.stage_runs["m"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipekit.model_error"].startswith(
        "TypeError: the dict output cannot be pickled (cannot pickle '_thread.lock' object)"
    )
    assert any("m: model not logged" in failure for failure in observer.failures)
    assert "m" not in observer.versions


def test_lineage_errors_name_what_is_missing(store):
    with pytest.raises(TrackingError, match=r"no MLflow store at sqlite:///mlflow\.db"):
        pk.lineage("cancer.train")
    cancer(store, "~stages.publish").run(progress=False)
    with pytest.raises(
        TrackingError, match=r"'cancer.trian' not found .*did you mean 'cancer.train'"
    ):
        pk.lineage("cancer.trian", uri=store)
    with pytest.raises(TrackingError, match=r"has no version 7 \(latest is 1\)"):
        pk.lineage("cancer.train", 7, uri=store)
    with pytest.raises(TrackingError, match=r"has no alias '@champion' \(aliases: none\)"):
        pk.lineage("cancer.train@champion", uri=store)
    assert pk.lineage("cancer.train/1", uri=store).root == "cancer.train/1"


def test_lineage_command(store, tmp_path, capsys):
    cancer(store).run(progress=False)
    svg = tmp_path / "l.svg"
    draw = ["--svg", str(svg)] if shutil.which("dot") else []
    assert main(["lineage", "cancer.train", "champion", "--uri", store, *draw]) == 0
    out = capsys.readouterr().out
    assert "cancer.train v1 @champion" in out and "consumed cancer.features/1" in out
    if draw:
        assert svg.read_bytes().startswith(b"<?xml")
    assert main(["lineage", "cancer.train", "--json", "--uri", store]) == 0
    assert '"root": "cancer.train/1"' in capsys.readouterr().out
    assert main(["lineage", "cancer.nope", "--uri", store]) == 1
    assert "pipekit: error: registered model 'cancer.nope' not found" in capsys.readouterr().err


# --- MLflow 3: logged models, run names, stage order --------------------------------------


def table(rows: int = 40) -> dict:
    """Two features, the target, and a column whose name says it holds a secret."""
    import pandas as pd

    values = [float(i) for i in range(rows)]
    frame = pd.DataFrame(
        {
            "x1": values,
            "x2": [v * v for v in values],
            "label": [i % 2 for i in range(rows)],
            "api_token": ["tok-not-for-mlflow"] * rows,
        }
    )
    return {"train": frame}


def fit_scaler(frame):
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(frame[["x1", "x2"]])


def fit_classifier(scaler, frame):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression().fit(scaler.transform(frame[["x1", "x2"]]), frame["label"])


def score(model, scaler, frame) -> dict:
    predicted = model.predict(scaler.transform(frame[["x1", "x2"]]))
    return {"accuracy": float((predicted == frame["label"]).mean())}


def models_pipeline(uri: str, **tracking) -> pk.Pipeline:
    """data -> scale (model) -> fit (model) -> score, without a serve section."""
    return pk.Pipeline.from_config(
        {
            "name": "mdl",
            "stages": {
                "data": {"_target_": "test_tracking.table"},
                "scale": {
                    "_target_": "test_tracking.fit_scaler",
                    "inputs": {"frame": "data.train"},
                    "model": True,
                },
                "fit": {
                    "_target_": "test_tracking.fit_classifier",
                    "inputs": {"scaler": "scale", "frame": "data.train"},
                    "model": True,
                },
                "score": {
                    "_target_": "test_tracking.score",
                    "inputs": {"model": "fit", "scaler": "scale", "frame": "data.train"},
                },
            },
            "executor": {"scheduler": "threads"},
            "cache": {"backend": "off"},
            "tracking": {"backend": "local", "uri": uri, **tracking},
        }
    )


def test_models_are_mlflow3_logged_models_linked_to_runs_metrics_and_versions(store):
    import json

    result = models_pipeline(store).run(progress=False)
    parent, children = runs_of(store, "mdl", result.run_id)
    client = MlflowClient(store)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert set(models) == {"scale", "fit"}  # the experiment's Models tab
    for stage, model in models.items():
        assert str(model.status) == "READY"
        assert model.source_run_id == children[stage].info.run_id
        assert model.tags["pipekit.stage"] == stage
        outputs = client.get_run(children[stage].info.run_id).outputs.model_outputs
        assert [o.model_id for o in outputs] == [model.model_id]
        version = client.get_model_version(f"mdl.{stage}", "1")
        assert version.source == f"models:/{model.model_id}"  # the UI's "Source model" link
        assert version.run_id == children[stage].info.run_id
        assert version.tags["pipekit.model_id"] == model.model_id
        assert client.get_model_version_download_uri(f"mdl.{stage}", "1") == (
            model.artifact_location
        )
        assert json.loads(model.tags["mlflow.modelVersions"]) == [
            {"name": f"mdl.{stage}", "version": 1}
        ]

    # the evaluating stage's metrics belong to the model it applies (not the scaler
    # that model was fitted on), and its run lists both models as inputs
    score_run = children["score"].info.run_id
    linked = {(m.key, m.run_id) for m in models["fit"].metrics}
    assert linked == {("accuracy", score_run)}
    assert not models["scale"].metrics
    assert children["score"].data.metrics["accuracy"] == result["score"]["accuracy"]
    inputs = client.get_run(score_run).inputs.model_inputs
    assert {i.model_id for i in inputs} == {models["fit"].model_id, models["scale"].model_id}

    # a signature and a few rows of what `scale` received: the columns it was fitted on
    folder = Path(mlflow.artifacts.download_artifacts(models["scale"].artifact_location))
    info = mlflow.models.get_model_info(str(folder))
    assert info.model_id == models["scale"].model_id
    assert info.run_id == children["scale"].info.run_id
    assert info.signature.inputs.input_names() == ["x1", "x2"]
    example = (folder / "input_example.json").read_text()
    assert "x1" in example and "label" not in example and "tok-not-for-mlflow" not in example
    assert len(json.loads(example)["data"]) == 5
    assert list(mlflow.sklearn.load_model(str(folder)).mean_) == pytest.approx([19.5, 513.5])


def test_input_rows_are_copied_small_and_masked():
    import numpy as np
    import pandas as pd

    from pipekit.tracking.flavors import sample

    frame = pd.DataFrame({"x": range(100), "db_password": ["hunter2"] * 100})
    rows = sample(frame)
    assert list(rows["x"]) == [0, 1, 2, 3, 4] and set(rows["db_password"]) == {"***"}
    assert set(frame["db_password"]) == {"hunter2"}  # the stage's own value is untouched
    array = np.arange(1000.0).reshape(500, 2)
    part = sample(array)
    assert part.shape == (5, 2) and part.base is None  # a copy, not a view of the whole
    assert sample([{"a": 1, "token": "t0ps3cret"}] * 9) == [{"a": 1, "token": "***"}] * 5
    assert sample(3) is None and sample([]) is None and sample(fit_scaler) is None


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["executor=threads", "tracking=local", "stages.train.params.C=0.5"], "cancer C=0.5"),
        (
            ["pipeline=cancer", "model=forest", "+stages.train.params.tol=1e-3"],
            "cancer model=forest tol=1e-3",
        ),
        (
            ["stages.a.params.C=1", "stages.b.params.C=2", "~stages.publish"],
            "cancer a.C=1 b.C=2 ~publish",
        ),
        (["cache=off", "hydra/launcher=basic", "tracking.uri=http://x"], "cancer-0123abcd"),
        (["+vars.db_password=hunter2", "seed=7"], "cancer seed=7"),
        (
            [f"stages.train.params.layers=[{','.join(map(str, range(40)))}]"],
            "cancer layers=[0,1,2,3,4,5,6,7,8,9,...",
        ),
    ],
)
def test_parent_run_names_read_like_the_overrides(overrides, name):
    from pipekit.tracking.tags import NAME_CHARS, run_name

    got = run_name("cancer", overrides, "0123abcd9999")
    assert got == name
    assert len(got) <= NAME_CHARS and "hunter2" not in got


def test_long_run_names_count_what_they_leave_out():
    from pipekit.tracking.tags import NAME_CHARS, run_name

    many = [f"stages.train.params.p{i}=value{i}" for i in range(30)]
    got = run_name("pipeline", many, "0123abcd")
    assert len(got) <= NAME_CHARS
    assert got.startswith("pipeline p0=value0 p1=value1 ") and got.endswith(" more")
    shown = got.split()[1:-2]
    assert int(got.split()[-2].lstrip("+")) == 30 - len(shown)


def test_sweep_jobs_are_named_by_their_overrides(user_conf, tmp_path):
    body = {
        "name": "sw",
        "stages": {
            "a": {
                "_target_": "scale_stages.counted",
                "params": {"log": str(tmp_path / "l"), "name": "a"},
            },
            "b": {
                "_target_": "scale_stages.counted",
                "inputs": {"x": "a"},
                "params": {"log": str(tmp_path / "l"), "name": "b", "value": 0},
            },
        },
    }
    conf = user_conf({"pipeline/sw.yaml": "# @package _global_\n" + yaml.safe_dump(body)})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    table = pk.sweep(
        "sw",
        {"stages.b.params.value": [1, 2]},
        config_dir=conf,
        overrides=["tracking=local", f"tracking.uri={uri}", "cache=off", "executor=sync"],
        progress=False,
    )
    client = MlflowClient(uri)
    names = {client.get_run(job.tracking["mlflow_run_id"]).info.run_name for job in table.jobs}
    assert names == {"sw value=1", "sw value=2"}


def test_stage_runs_start_in_dag_order_even_when_all_are_cached(store):
    """MLflow's UI lists nested runs by start time: each stage run starts after the runs
    of its upstream stages, also when all are announced at once from the cache."""
    stages = {
        "a": {"_target_": "core_stages.const", "params": {"value": 1}},
        "b": {"_target_": "core_stages.const", "params": {"value": 2}},
        "ab": {"_target_": "core_stages.add", "inputs": {"a": "a", "b": "b"}},
        "c": {"_target_": "core_stages.add", "inputs": {"a": "ab"}},
        "d": {"_target_": "core_stages.add", "inputs": {"a": "c", "b": "a"}},
    }
    pipeline = pk.Pipeline.from_config(
        {
            "name": "order",
            "stages": stages,
            "executor": {"scheduler": "threads"},
            "cache": {"backend": "local"},
            "tracking": {"backend": "local", "uri": store},
        }
    )
    for _ in range(2):  # computed, then every stage a cache hit
        result = pipeline.run(progress=False)
        parent, children = runs_of(store, "order", result.run_id)
        starts = {stage: run.info.start_time for stage, run in children.items()}
        assert len(set(starts.values())) == len(starts)  # no ties for the UI to shuffle
        for stage, spec in pipeline.spec.stages.items():
            for upstream in spec.upstream:
                assert starts[upstream] < starts[stage], (upstream, stage, starts)
        for run in children.values():
            assert parent.info.start_time <= run.info.start_time <= run.info.end_time
    assert set(result.status.values()) == {"cached"}


def test_retention_deletes_the_logged_model_with_its_last_version(store):
    import json

    pipeline = models_pipeline(store, keep_versions=1)
    for _ in range(2):
        pipeline.run(progress=False)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("mdl").experiment_id
    left = {m.name: m for m in client.search_logged_models([experiment])}
    assert set(left) == {"scale", "fit"}  # version 1's models are gone with it
    for stage, model in left.items():
        versions = client.search_model_versions(f"name = 'mdl.{stage}'")
        assert [v.version for v in versions] == [2]
        assert versions[0].source == f"models:/{model.model_id}"
        assert json.loads(model.tags["mlflow.modelVersions"]) == [
            {"name": f"mdl.{stage}", "version": 2}
        ]


# --- helpers ----------------------------------------------------------------------------


def test_flatten_params_dots_nested_keys():
    assert flatten_params({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}, "s": "x"}, "st.") == {
        "st.a": "1",
        "st.b.c": "[1, 2]",
        "st.b.d.e": "null",
        "st.s": "x",
    }


def test_config_hash_ignores_where_it_is_logged():
    base = {"name": "p", "stages": {"a": {"_target_": "x"}}, "tracking": {"uri": "a"}}
    assert config_hash(base) == config_hash({**base, "tracking": {"uri": "b"}})
    assert config_hash(base) != config_hash({**base, "seed": 1})


def test_git_commit_reads_refs_without_git(tmp_path):
    assert git_commit(tmp_path) is None
    sha = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    (tmp_path / "repo" / "sub").mkdir()
    assert git_commit(tmp_path / "repo" / "sub") == sha
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert git_commit(tmp_path / "repo") == sha
    (git / "HEAD").write_text(sha[::-1] + "\n")  # detached
    assert git_commit(tmp_path / "repo") == sha[::-1]


def test_cli_run_says_where_the_run_was_tracked(store, tmp_path, cli_env):
    proc = run_pipekit("run", "executor=sync", "cache=off", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    run_id = line.removeprefix("pipekit: tracked in MLflow run ").split()[0]
    parent = MlflowClient(store).get_run(run_id)  # the parent run itself
    experiment = parent.info.experiment_id
    assert line == (
        f"pipekit: tracked in MLflow run {run_id} ({store}) at http://127.0.0.1:5000/#/"
        f"experiments/{experiment}/runs/{run_id}?workflowType=machine_learning; "
        f"browse: mlflow ui --backend-store-uri {store}"
    )
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["pipekit.pipeline"] == "cancer"


# --- start-up cost: MLflow imported early when the run is tracked ---------------------


@pytest.mark.parametrize(
    "section, on",
    [
        ({"backend": "local"}, True),
        ({"backend": "server"}, True),
        ({"backend": "off"}, False),
        ({"backend": False}, False),  # YAML's bare `off`
        ({"backend": "local", "enabled": False}, False),
        (None, False),
    ],
)
def test_mlflow_is_imported_early_only_for_a_tracked_run(section, on):
    from pipekit.tracking import prewarm

    assert prewarm.tracking_on(section) is on


def test_prewarm_imports_the_store_modules_once_in_the_background():
    import importlib
    import sys as _sys

    from pipekit.tracking import prewarm

    prewarm.prewarm()
    thread = prewarm._thread
    if thread is not None:  # this process had not loaded them yet
        thread.join(120)
        assert not thread.is_alive()
    assert all(name in _sys.modules for name in prewarm.MODULES)
    prewarm.prewarm()  # again: nothing new is started
    assert prewarm._thread is thread
    importlib.import_module("mlflow.store.tracking.sqlalchemy_store")  # usable as loaded

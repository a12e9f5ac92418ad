"""The shipped book pipeline (conf/pipeline/book.yaml): files under a data directory,
new data landing as a batch file, re-runs that recompute only what new data changes."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

import pipekit as pk
from pipekit.errors import StageError
from pipekit.examples import book

STAGES = ["init_data_dir", "collect_1", "collect_2", "combine", "train", "publish"]


def load(tmp_path, *overrides: str) -> pk.Pipeline:
    return pk.load(
        "book",
        overrides=[f"vars.data_dir={tmp_path}/data", "tracking=off", "executor=sync", *overrides],
    )


def test_book_reruns_only_when_new_data_lands(tmp_path):
    first = load(tmp_path).run(progress=False)
    assert first.status == dict.fromkeys(STAGES, "done")
    assert first["combine"] == f"{tmp_path}/data/combined.csv"
    assert len(pd.read_csv(first["combine"])) == 2 * 200  # two sources, batch 0
    assert first["publish"]["accuracy"] >= 0.8

    # no new data: the collectors run (cache: false), their output is unchanged (early
    # cutoff), so nothing after them is combined or retrained
    collectors = {"collect_1": "done", "collect_2": "done"}
    for _ in range(2):
        again = load(tmp_path).run(progress=False)
        assert again.status == {**dict.fromkeys(STAGES, "cached"), **collectors}
        assert again.reasons["collect_1"] == "cache: false; output unchanged → combine cached"

    landed = book.land_batch(tmp_path / "data")
    assert landed.name == "batch-0001.json"
    third = load(tmp_path).run(progress=False)
    assert third.status == {"init_data_dir": "cached", **dict.fromkeys(STAGES[1:], "done")}
    combined = pd.read_csv(third["combine"])
    assert len(combined) == 2 * 2 * 200 and sorted(combined["batch"].unique()) == [0, 1]
    assert third.reasons["collect_1"] == "cache: false; output changed"
    assert third.reasons["combine"] == "upstream changed: collect_1, collect_2"


def test_no_new_data_registers_no_new_version(tmp_path, monkeypatch):
    """A real SQLite MLflow store: scheduled runs without new data add no book.train
    version; the run after a batch landed adds exactly one."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracked = ("tracking=local", f"tracking.uri={uri}")

    def versions() -> list[str]:
        found = MlflowClient(uri).search_model_versions("name='book.train'")
        return sorted(str(v.version) for v in found)

    assert load(tmp_path, *tracked).run(progress=False).status["train"] == "done"
    assert versions() == ["1"]
    for _ in range(2):
        again = load(tmp_path, *tracked).run(progress=False)
        assert again.status["train"] == "cached" and again.status["collect_1"] == "done"
    assert versions() == ["1"]
    book.land_batch(tmp_path / "data")
    assert load(tmp_path, *tracked).run(progress=False).status["train"] == "done"
    assert versions() == ["1", "2"]


def test_deleted_data_is_recreated(tmp_path):
    """The issue's first bullet: after `data/` is deleted a re-run writes the files again
    (and, the content being the same, trains nothing)."""
    import shutil

    load(tmp_path).run(progress=False)
    shutil.rmtree(tmp_path / "data")
    explained = load(tmp_path).explain()
    assert explained["combine"].action == "run"
    assert explained["combine"].reason == "outs changed: data/combined.csv missing"
    again = load(tmp_path).run(progress=False)
    assert again.status["combine"] == "done" and again.status["train"] == "cached"
    assert (tmp_path / "data/combined.csv").is_file()
    assert len(pd.read_csv(tmp_path / "data/combined.csv")) == 2 * 200
    assert (tmp_path / "data/raw/source_1.csv").is_file()


def test_the_data_is_deterministic(tmp_path):
    """Same seed and batches, same rows: the tests and the loop benchmark rely on it."""
    for folder in ("x", "y"):
        book.init_data_dir(str(tmp_path / folder))
        book.collect(str(tmp_path / folder), "source_1", str(tmp_path / folder / "s.csv"), 7)
    x, y = (pd.read_csv(tmp_path / f / "s.csv") for f in ("x", "y"))
    pd.testing.assert_frame_equal(x, y)
    other = book._rows(7, "source_2", 0, 200)
    assert not other[list(book.FEATURES)].equals(x[list(book.FEATURES)])


def test_the_gate_fails_below_the_threshold(tmp_path):
    pipeline = load(tmp_path, "stages.publish.params.threshold=0.999")
    with pytest.raises(StageError, match=r"stage 'publish'.*QualityGateError.*below the threshold"):
        pipeline.run(progress=False)


def test_a_malformed_batch_file_is_named(tmp_path):
    load(tmp_path).run(progress=False)
    (tmp_path / "data/batches/batch-0001.json").write_text("not json")
    with pytest.raises(StageError, match=r"batch-0001.json: not a batch file"):
        load(tmp_path).run(progress=False)


def test_the_serve_section_validates(tmp_path):
    from pipekit.core.serving import check_serve

    serve = check_serve(load(tmp_path).validate().spec)
    assert serve.order == ("proba", "respond") and serve.output == "respond"
    assert serve.models == {"train": None} and serve.model_name == "book.serving"
    assert (serve.alias, serve.export_on_promote, serve.poll_interval) == ("champion", True, 1.0)
    promote = load(tmp_path).stages["publish"]
    assert (promote.promote, promote.promote_metric, promote.promote_mode) == (
        "champion",
        "publish.accuracy",
        "max",
    )
    answer = book.respond(np.array([[0.2, 0.8], [0.9, 0.1]]))
    assert answer.to_dict(orient="list") == {"label": [1, 0], "probability": [0.8, 0.1]}
    assert list(book.request_example(rows=3).columns) == list(book.FEATURES)


def test_a_better_model_is_served_and_a_worse_one_is_not_promoted(tmp_path, monkeypatch):
    """Real SQLite store, a real server (in a thread, on 127.0.0.1) following
    book.serving@champion: a clean batch makes a better model, which is promoted, exported
    and answered with; a noisy batch makes a worse one, registered but not promoted, so
    @champion and the served version stay where they are."""
    import requests
    from mlflow import MlflowClient

    from pipekit.serve.server import VERSION_HEADER, Server

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracked = ("tracking=local", f"tracking.uri={uri}")
    client = MlflowClient(uri)

    def versions(model: str) -> list[str]:
        return sorted(str(v.version) for v in client.search_model_versions(f"name='{model}'"))

    def champion(model: str) -> str:
        return str(client.get_registered_model(model).aliases["champion"])

    first = load(tmp_path, *tracked).run(progress=False)
    assert first.tracking["serving_version"] == "book.serving/1"
    rows = book.request_example(rows=3)
    payload = {"dataframe_split": rows.to_dict(orient="split", index=False)}
    spec = load(tmp_path, *tracked).spec
    with Server.for_pipeline(spec, port=0, poll_interval=0.2) as server:

        def ask() -> requests.Response:
            answer = requests.post(f"{server.url}/invocations", json=payload, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer

        answer = ask()
        assert answer.headers[VERSION_HEADER] == "1"
        expected = book.respond(first["train"].predict_proba(rows))
        served = pd.DataFrame(answer.json()["predictions"])
        assert served["label"].tolist() == expected["label"].tolist()
        assert served["probability"].tolist() == pytest.approx(expected["probability"].tolist())

        book.land_batch(tmp_path / "data", noise=0.0)  # clean labels: a better model
        better = load(tmp_path, *tracked).run(progress=False)
        assert better["publish"]["accuracy"] > first["publish"]["accuracy"]
        assert better.tracking["serving_version"] == "book.serving/2"
        assert champion("book.train") == "2" and champion("book.serving") == "2"
        deadline = time.monotonic() + 60
        while ask().headers[VERSION_HEADER] != "2" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ask().headers[VERSION_HEADER] == "2"

        book.land_batch(tmp_path / "data", noise=1.5)  # noisy labels: a worse model
        worse = load(tmp_path, *tracked).run(progress=False)
        assert worse.status["train"] == "done" and worse.status["publish"] == "done"
        assert worse["publish"]["accuracy"] < better["publish"]["accuracy"]
        assert versions("book.train") == ["1", "2", "3"]  # trained and registered...
        assert champion("book.train") == "2"  # ...but not promoted
        assert versions("book.serving") == ["1", "2"] and champion("book.serving") == "2"
        assert worse.tracking["serving_version"] == "book.serving/2"
        time.sleep(0.5)  # a few polls: nothing to follow
        assert ask().headers[VERSION_HEADER] == "2"
        assert server.follower.status()["swaps"] == 1

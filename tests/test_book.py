"""The shipped book pipeline (conf/pipeline/book.yaml): files under a data directory,
new data landing as a batch file, re-runs that recompute only what new data changes."""

from __future__ import annotations

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

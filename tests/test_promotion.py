"""Promotion that picks the best version, and registry retention (issue 13 item 4).

Real SQLite MLflow stores in tmp_path, tiny scikit-learn models (tests/core_stages.py).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import yaml
from conftest import make, run_pipekit

from pipekit.errors import PromotionConfigError

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

GATE = {"alias": "champion", "metric": "rate.score", "mode": "max"}


@dataclass(frozen=True)
class Store:
    """The module's SQLite store (one: creating one costs seconds) and this test's pipeline
    name, so each test has its own experiment and registered model `<name>.fit`."""

    uri: str
    name: str

    @property
    def model(self) -> str:
        return f"{self.name}.fit"


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"


@pytest.fixture
def store(shared_uri, request, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Store(shared_uri, re.sub(r"\W+", "_", request.node.name))


def gated(store: Store, C: float, promote=GATE, keep: int | None = None, **publish):
    """fit (model) -> rate (metric `score` = C) -> publish (gate with `promote`)."""
    tracking = {"backend": "local", "uri": store.uri}
    if keep is not None:
        tracking["keep_versions"] = keep
    return make(
        {
            "fit": {"_target_": "fit_logreg", "params": {"C": C}, "model": True},
            "rate": {"_target_": "rate_model", "inputs": {"model": "fit"}, "metrics": ["score"]},
            "publish": {"_target_": "const", "after": ["rate"], "promote": promote, **publish},
        },
        name=store.name,
        executor={"scheduler": "sync"},
        tracking=tracking,
    )


def champion(store: Store) -> str:
    return str(MlflowClient(store.uri).get_registered_model(store.model).aliases["champion"])


def publish_tags(store: Store, run_id: str) -> dict:
    client = MlflowClient(store.uri)
    exp = client.get_experiment_by_name(store.name)
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`pipekit.run_id` = '{run_id}' and tags.`pipekit.stage` = 'publish'",
    )
    assert len(found) == 1
    return found[0].data.tags


def test_metric_promotion_moves_only_on_a_better_version(store):
    first = gated(store, 1.0).run(progress=False)
    assert champion(store) == "1"
    assert "first holder" in publish_tags(store, first.run_id)["pipekit.promotion"]

    worse = gated(store, 0.5).run(progress=False)  # v2: 0.5 < 1.0
    assert champion(store) == "1"
    tags = publish_tags(store, worse.run_id)
    assert "does not beat holder 1" in tags["pipekit.promotion"]
    assert "pipekit.promoted" not in tags

    gated(store, 1.0).run(progress=False)  # v3: a tie keeps the holder
    assert champion(store) == "1"

    better = gated(store, 2.0).run(progress=False)  # v4 beats it
    assert champion(store) == "4"
    assert publish_tags(store, better.run_id)["pipekit.promoted"] == f"@champion: {store.model}/4"

    client = MlflowClient(store.uri)
    values = {
        v: client.get_model_version(store.model, v).tags["pipekit.metric.rate.score"]
        for v in "1234"
    }
    assert {v: float(t) for v, t in values.items()} == {"1": 1.0, "2": 0.5, "3": 1.0, "4": 2.0}


def test_mode_min_prefers_the_lower_value(store):
    low = {**GATE, "mode": "min"}
    gated(store, 1.0, low).run(progress=False)
    gated(store, 2.0, low).run(progress=False)
    assert champion(store) == "1"
    gated(store, 0.25, low).run(progress=False)
    assert champion(store) == "3"


def test_holder_without_the_metric_tag_is_compared_by_its_run(store):
    """A holder promoted by a plain alias (no metric tag) is judged by its run's metric."""
    gated(store, 3.0, "champion").run(progress=False)  # plain alias: moves unconditionally
    assert champion(store) == "1"
    assert (
        "pipekit.metric.rate.score"
        not in MlflowClient(store.uri).get_model_version(store.model, "1").tags
    )
    gated(store, 2.0).run(progress=False)  # 2.0 < 3.0 read from run 1's parent metrics
    assert champion(store) == "1"
    gated(store, 4.0).run(progress=False)
    assert champion(store) == "3"


def test_plain_alias_still_moves_unconditionally(store):
    gated(store, 2.0, "champion").run(progress=False)
    gated(store, 0.1, "champion").run(progress=False)
    assert champion(store) == "2"


def test_a_missing_metric_value_leaves_the_alias_and_says_so(store):
    pipeline = make(
        {
            "fit": {"_target_": "fit_logreg", "model": True},
            "rate": {"_target_": "rate_model", "inputs": {"model": "fit"}, "params": {"key": "x"}},
            "publish": {"_target_": "const", "after": ["rate"], "promote": GATE},
        },
        name=store.name,
        executor={"scheduler": "sync"},
        tracking={"backend": "local", "uri": store.uri},
    )
    result = pipeline.run(progress=False)
    assert "rate.score has no value" in result.tracking["tracking_error"]
    assert "pipekit.promote_error" in publish_tags(store, result.run_id)
    assert MlflowClient(store.uri).get_registered_model(store.model).aliases == {}


def self_promoting(store: Store, C: float, promote):
    return make(
        {
            "cv": {"_target_": "cv_score", "params": {"C": C}, "metrics": ["score"]},
            "fit": {
                "_target_": "fit_logreg",
                "inputs": {"C": "cv.C"},
                "model": True,
                "promote": promote,
            },
        },
        name=store.name,
        executor={"scheduler": "sync"},
        tracking={"backend": "local", "uri": store.uri},
    )


def test_promote_on_the_model_stage_itself(store):
    self_promoting(store, 1.0, "newest").run(progress=False)
    client = MlflowClient(store.uri)
    assert client.get_registered_model(store.model).aliases == {"newest": 1}
    metric = {"alias": "champion", "metric": "cv.score"}
    for C in (1.0, 3.0, 2.0):  # v2, v3, v4: v3 (3.0) is the best
        self_promoting(store, C, metric).run(progress=False)
    assert champion(store) == "3"


@pytest.mark.parametrize("order", [(0.3, 3.0, 1.0), (3.0, 1.0, 0.3), (1.0, 0.3, 3.0)])
def test_sweep_like_sequence_promotes_the_best_in_any_order(store, order):
    for C in order:
        gated(store, C).run(progress=False)
    best = str(order.index(3.0) + 1)
    assert champion(store) == best
    client = MlflowClient(store.uri)
    made_by = client.get_model_version(store.model, best).run_id  # the fit stage's run
    assert client.get_run(made_by).data.params["fit.C"] == "3.0"


def test_concurrent_jobs_cannot_race_past_the_best(store):
    """Three jobs promoting at once (threads, one observer each) end at the best."""
    gated(store, 0.1).run(progress=False)  # creates the store and the model first
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda C: gated(store, C).run(progress=False), (2.0, 5.0, 3.0)))
    assert all(not r.errors and not r.tracking.get("tracking_error") for r in results)
    client = MlflowClient(store.uri)
    holder = client.get_model_version(store.model, champion(store))
    assert float(holder.tags["pipekit.metric.rate.score"]) == 5.0


def test_retention_keeps_n_and_every_aliased_version(store):
    gated(store, 5.0, keep=2).run(progress=False)  # v1 @champion, never beaten below
    for C in (1.0, 2.0, 3.0, 4.0):  # v2..v5 (worse): older unaliased ones go
        gated(store, C, keep=2).run(progress=False)
    client = MlflowClient(store.uri)
    left = sorted(int(v.version) for v in client.search_model_versions(f"name = '{store.model}'"))
    assert left == [1, 4, 5]
    assert champion(store) == "1"


# --- a promote that can never act: a config error (CLI exit 2, one line) ---------------

NEVER = {
    "no_model": (
        {
            "data": {"_target_": "const"},
            "gate": {"_target_": "const", "after": ["data"], "promote": "champion"},
        },
        ["stages.gate.promote can never act", "no model stage"],
    ),
    "unknown_stage": (
        {
            "fit": {"_target_": "fit_logreg", "model": True},
            "rate": {"_target_": "rate_model", "inputs": {"model": "fit"}},
            "publish": {
                "_target_": "const",
                "after": ["rate"],
                "promote": {"alias": "c", "metric": "rat.score"},
            },
        },
        ["stages.publish.promote.metric 'rat.score' names no stage", "did you mean 'rate'?"],
    ),
    "not_upstream": (
        {
            "fit": {"_target_": "fit_logreg", "model": True},
            "rate": {"_target_": "rate_model", "inputs": {"model": "fit"}},
            "publish": {
                "_target_": "const",
                "after": ["fit"],
                "promote": {"alias": "c", "metric": "rate.score"},
            },
        },
        ["stages.publish.promote.metric 'rate.score'", "not upstream of 'publish'"],
    ),
    "bad_mode": (
        {
            "fit": {"_target_": "fit_logreg", "model": True},
            "rate": {"_target_": "rate_model", "inputs": {"model": "fit"}},
            "publish": {
                "_target_": "const",
                "after": ["rate"],
                "promote": {"alias": "c", "metric": "rate.score", "mode": "maxx"},
            },
        },
        ["stages.publish.promote.mode must be max or min", "did you mean 'max'?"],
    ),
    "undeclared_metric": (
        {
            "fit": {"_target_": "fit_logreg", "model": True},
            "rate": {"_target_": "rate_model", "inputs": {"model": "fit"}, "metrics": ["score"]},
            "publish": {
                "_target_": "const",
                "after": ["rate"],
                "promote": {"alias": "c", "metric": "rate.scor"},
            },
        },
        ["stages.publish.promote.metric 'rate.scor'", "did you mean 'score'?"],
    ),
    "unknown_key": (
        {
            "fit": {
                "_target_": "fit_logreg",
                "model": True,
                "promote": {"alias": "c", "metrc": "x.y"},
            },
        },
        ["stages.fit.promote.metrc is not a promote setting", "did you mean 'metric'?"],
    ),
}


def _stages(stages: dict) -> dict:
    return {
        name: {**body, "_target_": f"core_stages.{body['_target_']}"}
        for name, body in stages.items()
    }


@pytest.mark.parametrize("case", sorted(NEVER))
def test_never_acting_promote_is_a_config_error(case):
    stages, fragments = NEVER[case]
    with pytest.raises(PromotionConfigError) as caught:
        make(stages, name="t").validate()
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize("case", ["no_model", "unknown_stage", "not_upstream", "bad_mode"])
def test_cli_never_acting_promote_exits_2_with_one_line(case, user_conf, cli_env, tmp_path):
    stages, fragments = NEVER[case]
    body = yaml.safe_dump({"name": "t", "stages": _stages(stages)}, sort_keys=False)
    conf = user_conf({f"pipeline/{case}.yaml": "# @package _global_\n" + body})
    proc = run_pipekit("validate", "-cd", str(conf), f"pipeline={case}", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipekit: error: pipeline 't'")
    for fragment in fragments:
        assert fragment in lines[0]


def test_keep_versions_is_validated():
    from pipekit.errors import TrackingConfigError

    pipeline = gated(Store("sqlite:///x.db", "t"), 1.0, keep=0)
    with pytest.raises(
        TrackingConfigError, match=r"tracking\.keep_versions must be a positive integer"
    ):
        pipeline.validate()


def test_settle_repairs_a_racing_overwrite(store):
    """Without a lock (a server store), a promoter settles the alias on the best candidate."""
    from pipekit.tracking.promotion import settle

    for C in (1.0, 3.0, 2.0):
        gated(store, C).run(progress=False)
    client = MlflowClient(store.uri)
    assert champion(store) == "2"
    client.set_registered_model_alias(store.model, "champion", "3")  # a racer's late write
    assert settle(client, store.model, "champion", "pipekit.metric.rate.score", "max") == "2"
    assert champion(store) == "2"

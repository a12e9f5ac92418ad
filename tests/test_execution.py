"""Running pipelines on Dask: outputs, parallel branches, partial runs, retries, failures, events."""

from __future__ import annotations

import pytest
from conftest import make, pipeline_file

import pipekit as pk
from pipekit.core.events import Observer
from pipekit.errors import OutputKeyError, StageError

EXECUTORS = ["sync", "threads", "processes"]


def chain():
    return make(
        {
            "one": {"_target_": "const", "params": {"value": 10}},
            "two": {"_target_": "split", "inputs": {"value": "one"}},
            "head": {"_target_": "add", "inputs": {"a": "two.head"}, "params": {"b": 1}},
            "tail": {"_target_": "add", "inputs": {"a": "two.tail", "b": "head"}},
        }
    )


@pytest.mark.parametrize("executor", EXECUTORS)
def test_outputs_flow_along_edges(executor):
    result = chain().run(executor=executor, progress=False)
    assert result["two"] == {"head": 5, "tail": 5}
    assert result["head"] == 6 and result["tail"] == 11
    assert result.status == dict.fromkeys(["one", "two", "head", "tail"], "done")
    assert result.ok and set(result.durations) == set(result.status)


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_independent_branches_run_in_parallel(executor, tmp_path):
    # each stage only returns if the other is running at the same moment
    p = make(
        {
            "left": {
                "_target_": "rendezvous",
                "params": {"directory": str(tmp_path), "me": "l", "other": "r"},
            },
            "right": {
                "_target_": "rendezvous",
                "params": {"directory": str(tmp_path), "me": "r", "other": "l"},
            },
            "join": {"_target_": "add", "inputs": {"a": "left", "b": "right"}},
        },
        executor={"scheduler": executor, "num_workers": 2},
    )
    result = p.run(progress=False)
    assert result.ok, result.errors
    if executor == "processes":
        assert result["left"] != result["right"]  # two worker processes


def test_targets_run_only_what_they_need(tmp_path):
    marker = tmp_path / "count"
    p = make(
        {
            "a": {"_target_": "const", "params": {"value": 2}},
            "b": {"_target_": "add", "inputs": {"a": "a"}},
            "other": {"_target_": "flaky", "params": {"counter": str(marker), "fail_times": 0}},
            "c": {"_target_": "add", "inputs": {"a": "b", "b": "other"}},
        }
    )
    result = p.run(targets=["b"], executor="sync", progress=False)
    assert set(result.status) == {"a", "b"}
    assert result["b"] == 2 and not marker.exists()
    assert p.plan(["c"]) == ["a", "b", "other", "c"]


def test_retries_rerun_a_failing_stage(tmp_path):
    counter = tmp_path / "attempts"
    p = make(
        {
            "f": {
                "_target_": "flaky",
                "params": {"counter": str(counter), "fail_times": 2},
                "retries": 2,
            }
        }
    )
    assert p.run(executor="sync", progress=False)["f"] == 3
    assert counter.read_text() == "3"


def test_retries_exhausted_names_attempts(tmp_path):
    counter = tmp_path / "attempts"
    p = make(
        {
            "f": {
                "_target_": "flaky",
                "params": {"counter": str(counter), "fail_times": 5},
                "retries": 1,
            }
        }
    )
    with pytest.raises(StageError, match=r"stage 'f' failed \(after 2 attempts\): RuntimeError"):
        p.run(executor="sync", progress=False)
    assert counter.read_text() == "2"


@pytest.mark.parametrize("executor", EXECUTORS)
def test_failure_names_stage_skips_downstream_finishes_branches(executor):
    p = make(
        {
            "a": {"_target_": "const", "params": {"value": 1}},
            "bad": {"_target_": "boom", "inputs": {"x": "a"}, "params": {"message": "no data"}},
            "after_bad": {"_target_": "add", "inputs": {"a": "bad"}},
            "ordered": {"_target_": "const", "after": ["bad"]},
            "fine": {"_target_": "add", "inputs": {"a": "a"}, "params": {"b": 41}},
        }
    )
    with pytest.raises(StageError) as info:
        p.run(executor=executor, progress=False)
    error = info.value
    assert error.stage == "bad" and isinstance(error.cause, ValueError)
    assert "stage 'bad' failed: ValueError: no data" in str(error)
    assert "boom" in error.traceback
    result = error.result
    assert result.status == {
        "a": "done",
        "bad": "failed",
        "after_bad": "skipped",
        "ordered": "skipped",
        "fine": "done",
    }
    assert result["fine"] == 42
    with pytest.raises(KeyError, match="skipped: upstream stage 'bad' failed"):
        result["after_bad"]


def test_raise_on_failure_false_returns_result():
    p = make({"bad": {"_target_": "boom"}, "ok": {"_target_": "const"}})
    result = p.run(executor="sync", progress=False, raise_on_failure=False)
    assert result.failed == ["bad"] and result["ok"] == 1 and not result.ok


@pytest.mark.parametrize("executor", ["sync", "processes"])
def test_key_of_non_mapping_output_names_both_stages(executor):
    p = make(
        {
            "a": {"_target_": "const", "params": {"value": 3}},
            "b": {"_target_": "add", "inputs": {"a": "a.head"}},
        }
    )
    with pytest.raises(OutputKeyError) as info:
        p.run(executor=executor, progress=False)
    message = str(info.value)
    assert "stage 'b' input 'a'" in message and "stage 'a' returned" in message
    assert "int, not a mapping" in message


def test_missing_key_lists_available_keys():
    p = make(
        {
            "a": {"_target_": "split", "params": {"value": 3}},
            "b": {"_target_": "add", "inputs": {"a": "a.middle"}},
        }
    )
    with pytest.raises(OutputKeyError, match=r"no key 'middle' \(keys: head, tail\)"):
        p.run(executor="sync", progress=False)


class Recorder(Observer):
    def __init__(self):
        self.log = []

    def run_started(self, run):
        self.log.append(("start", run.stages))

    def stage_changed(self, event):
        self.log.append((event.stage, event.state))

    def run_finished(self, run, result):
        self.log.append(("finish", dict(result.status)))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_lifecycle_events_in_order(executor):
    recorder = Recorder()
    p = make(
        {
            "a": {"_target_": "const"},
            "bad": {"_target_": "boom", "inputs": {"x": "a"}},
            "c": {"_target_": "add", "inputs": {"a": "bad"}},
        }
    )
    p.run(executor=executor, observers=[recorder], progress=False, raise_on_failure=False)
    log = recorder.log
    assert log[0] == ("start", ("a", "bad", "c")) and log[-1][0] == "finish"
    for stage, states in {
        "a": ["pending", "running", "done"],
        "bad": ["pending", "running", "failed"],
        "c": ["pending", "skipped"],  # never started: its upstream failed
    }.items():
        assert [s for name, s in log if name == stage] == states


def test_a_broken_observer_does_not_break_the_run():
    class Broken(Observer):
        def stage_changed(self, event):
            raise RuntimeError("observer bug")

    assert (
        make({"a": {"_target_": "const"}}).run(
            executor="sync", observers=[Broken()], progress=False
        )["a"]
        == 1
    )


def test_to_delayed_is_a_lazy_dask_object():
    from dask.delayed import Delayed

    delayed = chain().validate().to_delayed(["head"])
    assert isinstance(delayed, Delayed)
    assert delayed.compute(scheduler="sync") == (10, {"head": 5, "tail": 5}, 6)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_example_pipeline_runs_on_each_executor(executor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = pk.load("cancer", overrides=[f"executor={executor}", "tracking=off", "cache=off"])
    result = p.run(progress=False)
    assert result.ok
    assert result["evaluate"]["roc_auc"] > 0.95
    assert result["publish"]["approved"] is True
    assert len(result["combine"]) == 569  # both sources combined


def test_publish_gate_fails_below_threshold(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = pk.load(
        "cancer",
        overrides=[
            "executor=sync",
            "tracking=off",
            "cache=off",
            "stages.publish.params.threshold=1.01",
        ],
    )
    with pytest.raises(StageError, match="stage 'publish' failed: PublishRejected: roc_auc="):
        p.run(progress=False)


def test_config_group_swaps_the_estimator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    forest = pk.load(
        "wine", overrides=["model=forest", "executor=sync", "tracking=off", "cache=off"]
    )
    assert forest.stages["estimator"].target == "sklearn.ensemble.RandomForestClassifier"
    logreg = pk.load("wine", overrides=["executor=sync", "tracking=off", "cache=off"])
    assert logreg.stages["estimator"].target == "sklearn.linear_model.LogisticRegression"
    model = forest.run(progress=False)["train"][-1]  # after the StandardScaler
    assert type(model).__name__ == "RandomForestClassifier" and model.n_estimators == 200


def test_load_is_repeatable_and_overrides_apply():
    first = pk.load("cancer", overrides=["stages.train.params.C=0.5"])
    second = pk.load("cancer")
    assert first.stages["train"].params["C"] == 0.5
    assert second.stages["train"].params["C"] == 1.0
    third = second.with_overrides(["stages.train.params.C=2"])
    assert third.stages["train"].params["C"] == 2 and third.name == "cancer"
    fourth = third.with_overrides(["stages.train.params.C=3", "executor=sync"])
    assert fourth.stages["train"].params["C"] == 3
    assert fourth.spec.section("executor")["scheduler"] == "sync"
    assert fourth.overrides.count("stages.train.params.C=3") == 1
    assert "stages.train.params.C=2" not in fourth.overrides


def test_with_overrides_on_a_pipeline_not_made_by_hydra():
    p = make({"a": {"_target_": "const", "params": {"value": 1}}, "b": {"_target_": "const"}})
    q = p.with_overrides(["stages.a.params.value=5", "~stages.b", "+vars.x=1"])
    assert q.stages["a"].params["value"] == 5 and list(q.stages) == ["a"]
    assert q.run(executor="sync", progress=False)["a"] == 5
    assert p.stages["a"].params["value"] == 1  # the original is untouched
    with pytest.raises(pk.ConfigError, match="overrides look like"):
        p.with_overrides(["stages.a.params.value=["])


def test_user_config_dir_keeps_pipekit_groups(user_conf):
    conf = user_conf(
        {
            "config.yaml": {"defaults": [{"pipeline": "mine"}, {"executor": "sync"}, "_self_"]},
            **pipeline_file("mine", a="{_target_: core_stages.const, params: {value: 7}}"),
        }
    )
    p = pk.load(config_dir=conf)
    assert p.name == "mine" and p.spec.section("executor")["scheduler"] == "sync"
    assert p.run(progress=False)["a"] == 7
    assert (
        pk.load(config_dir=conf, overrides=["executor=threads"]).spec.section("executor")[
            "scheduler"
        ]
        == "threads"
    )


def test_bad_override_in_python_is_a_config_error():
    with pytest.raises(pk.ConfigError, match="Could not override"):
        pk.load("cancer", overrides=["stages.nope.params.x=1"])


def test_a_dataclass_output_feeds_its_fields_as_it_validates():
    """`inputs: {a: split.test}` on a dataclass output reads the field, on every scheduler."""
    for scheduler in ("sync", "threads"):
        p = make(
            {
                "split": {"_target_": "split_data", "params": {"n": 6}},
                "total": {"_target_": "add", "inputs": {"a": "split.train", "b": "split.test"}},
            },
            executor={"scheduler": scheduler},
        )
        assert p.validate().run(progress=False)["total"] == [0, 1, 2, 3, 4, 5]

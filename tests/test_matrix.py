"""Stage matrices: expansion after composition, fan-in, names, targets, overrides, drawing,
the cache per member, and MLflow runs per member."""

from __future__ import annotations

import pytest
import yaml
from conftest import make, run_pipekit

from pipekit.display.dot import dot_source, matrix_state
from pipekit.errors import (
    ConfigTypeError,
    DuplicateArgumentError,
    MatrixError,
    TargetImportError,
    UnknownKeyError,
    UnknownStageError,
)

REGIONS = ["eu", "us", "apac"]
MODELS = ["logreg", "forest"]


def stages(**extra):
    """data -> train (3x2 matrix) -> evaluate (paired, 3x2) -> compare (fan-in)."""
    found = {
        "data": {"_target_": "core_stages.const", "params": {"value": 7}},
        "train": {
            "_target_": "scale_stages.fit",
            "matrix": {"region": REGIONS, "model": MODELS},
            "inputs": {"data": "data"},
            "params": {"C": 1.0},
        },
        "evaluate": {
            "_target_": "scale_stages.score",
            "matrix": {"region": REGIONS, "model": MODELS},
            "inputs": {"trained": "train"},
        },
        "compare": {
            "_target_": "scale_stages.collect",
            "inputs": {"models": "evaluate[*].accuracy", "items": "train[:]"},
        },
    }
    found.update(extra)
    return found


def member(base, region, model):
    return f"{base}[region={region},model={model}]"


def test_a_3x2_matrix_runs_6_members_and_fans_in(tmp_path):
    p = make(stages(), cache={"backend": "local", "path": str(tmp_path / "cache")})
    trains = [member("train", r, m) for r in REGIONS for m in MODELS]
    assert p.spec.matrices["train"] == tuple(trains)
    assert p.stages[trains[3]].params == {"C": 1.0, "region": "us", "model": "forest"}
    result = p.run(executor="threads", progress=False)
    assert result.ok, result.errors
    assert sum(name.startswith("train[") for name in result.status) == 6
    assert result[member("train", "apac", "forest")] == {
        "region": "apac",
        "model": "forest",
        "C": 1.0,
        "data": 7,
    }
    # paired: each evaluate member got the train member with the same axis values
    assert result[member("evaluate", "us", "forest")] == {"accuracy": 0.71}
    out = result["compare"]
    assert list(out["models"]) == [member("evaluate", r, m) for r in REGIONS for m in MODELS]
    assert out["models"][member("evaluate", "eu", "logreg")] == 0.61  # `.accuracy` per member
    assert [item["region"] for item in out["items"]] == ["eu", "eu", "us", "us", "apac", "apac"]


def test_overrides_apply_to_every_member_and_members_can_be_addressed():
    p = make(stages())
    changed = p.with_overrides(["stages.train.params.C=5.0"])
    assert {changed.stages[m].params["C"] for m in changed.spec.matrices["train"]} == {5.0}
    one = make(
        stages(
            train={
                **stages()["train"],
                "members": [{"where": {"region": "us", "model": "forest"}, "params": {"C": 9.0}}],
            }
        )
    )
    values = {m: one.stages[m].params["C"] for m in one.spec.matrices["train"]}
    assert values.pop(member("train", "us", "forest")) == 9.0
    assert set(values.values()) == {1.0}


def test_targets_take_a_matrix_a_selector_or_one_member(tmp_path):
    p = make(stages())
    assert set(p.plan("train")) == {"data", *p.spec.matrices["train"]}
    assert p.plan([member("train", "eu", "logreg")]) == ["data", member("train", "eu", "logreg")]
    assert p.plan("train[region=us]") == [
        "data",
        member("train", "us", "logreg"),
        member("train", "us", "forest"),
    ]
    with pytest.raises(UnknownStageError, match=r"train\[region=mars"):
        p.plan("train[region=mars,model=logreg]")


def test_foreach_members_get_item_and_a_selector_fans_in_a_subset():
    p = make(
        {
            "each": {
                "_target_": "core_stages.kwargs_ok",
                "foreach": ["a", "b"],
            },
            "all": {"_target_": "scale_stages.collect", "inputs": {"items": "each[:]"}},
            "one": {"_target_": "scale_stages.collect", "inputs": {"models": "each[b]"}},
        }
    )
    assert list(p.spec.matrices["each"]) == ["each[a]", "each[b]"]
    assert p.stages["each[a]"].params == {"item": "a"}
    result = p.run(executor="sync", progress=False)
    assert result["all"]["items"] == [["item"], ["item"]]
    assert result["one"]["models"] == ["item"]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"compare": {"_target_": "scale_stages.collect", "inputs": {"models": "train"}}},
            MatrixError,
            r"stage 'compare' input 'models' refers to matrix stage 'train' \(6 members\).*"
            r"train\[\*\]",
        ),
        (
            {"compare": {"_target_": "scale_stages.collect", "inputs": {"models": "train[x=1]"}}},
            UnknownStageError,
            r"unknown member 'train\[x=1\]'",
        ),
        (
            {
                "compare": {
                    "_target_": "scale_stages.collect",
                    "inputs": {"models": "data[*]"},
                }
            },
            UnknownStageError,
            r"'data' is not a matrix stage",
        ),
        (
            {"train": {**stages()["train"], "matrix": {"region": ["eu", "a=b"]}}},
            MatrixError,
            r"matrix.region value 'a=b' cannot name a member",
        ),
        (
            {"train": {**stages()["train"], "matrix": {"C": [1, 2]}}},
            DuplicateArgumentError,
            r"'C' is both a matrix axis and a param",
        ),
        (
            {"train": {**stages()["train"], "matrix": {"region": "eu"}}},
            ConfigTypeError,
            r"matrix.region must be a list of values",
        ),
        (
            {"train": {**stages()["train"], "members": [{"where": {"regio": "eu"}}]}},
            MatrixError,
            r"'regio' is not a matrix axis \(did you mean 'region'\?\)",
        ),
    ],
)
def test_bad_matrices_and_references_are_named(change, error, message):
    config = stages(**change)
    with pytest.raises(error, match=message):
        make(config).validate()


def test_a_matrix_is_drawn_as_one_stacked_node_with_a_count():
    p = make(stages())
    source = dot_source(p.spec)
    assert '"train" [label=<<b>train</b> &times;6' in source and "shape=box3d" in source
    assert '"train[region' not in source  # no node or edge of a member
    assert source.count('"train" -> "evaluate"') == 1  # one edge per matrix pair
    status = {name: "done" for name in p.stages}
    status[member("train", "us", "logreg")] = "failed"
    coloured = dot_source(p.spec, status)
    assert '"train" [style="filled,bold"' in coloured and 'class="stage failed"' in coloured
    assert matrix_state(["done", "pending"]) == "running"
    assert matrix_state(["cached", "cached"]) == "cached"


def test_the_cache_keys_each_member(tmp_path):
    log = tmp_path / "log"
    config = {
        "m": {
            "_target_": "scale_stages.counted",
            "matrix": {"name": ["a", "b", "c"]},
            "params": {"log": str(log)},
        },
        "all": {"_target_": "scale_stages.collect", "inputs": {"items": "m[:]"}},
    }
    cache = {"backend": "local", "path": str(tmp_path / "cache")}
    first = make(config, cache=cache).run(executor="sync", progress=False)
    assert first.ok and sorted(log.read_text().split()) == ["a", "b", "c"]
    again = make(config, cache=cache).run(executor="sync", progress=False)
    assert set(again.status.values()) == {"cached"}
    one = {**config["m"], "members": [{"where": {"name": "b"}, "params": {"value": 1}}]}
    third = make({**config, "m": one}, cache=cache).run(executor="sync", progress=False)
    assert third.status == {
        "m[name=a]": "cached",
        "m[name=b]": "done",
        "m[name=c]": "cached",
        "all": "done",
    }
    assert sorted(log.read_text().split()) == ["a", "b", "b", "c"]


def test_a_large_matrix_expands_without_yaml():
    p = make(
        {
            "m": {"_target_": "core_stages.const", "matrix": {"value": list(range(5000))}},
            "total": {"_target_": "scale_stages.collect", "inputs": {"items": "m[:]"}},
        }
    )
    assert len(p.stages) == 5001
    result = p.run(executor="sync", progress=False)
    assert result["total"]["items"] == list(range(5000))


def test_mlflow_gets_a_nested_run_per_member(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = make(stages(), tracking={"backend": "local", "uri": uri})
    result = p.run(executor="threads", progress=False)
    assert result.ok, result.errors
    client = MlflowClient(uri)
    runs = client.search_runs([result.tracking["mlflow_experiment_id"]], max_results=100)
    names = {r.data.tags["mlflow.runName"]: r for r in runs}
    run = names[member("train", "apac", "logreg")]
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipekit.matrix"] == "train"
    assert yaml.safe_load(run.data.tags["pipekit.member"]) == {"region": "apac", "model": "logreg"}
    assert run.data.params["train/region:apac/model:logreg.C"] == "1.0"
    parent = names[next(n for n in names if n.startswith("t-"))]
    assert "evaluate/region:eu/model:forest.accuracy" in parent.data.metrics
    assert sum(n.startswith("train[") for n in names) == 6


def test_cli_runs_one_member_and_shows_the_matrix(user_conf, cli_env, tmp_path):
    body = {"name": "mx", "stages": stages()}
    conf = user_conf(
        {"pipeline/mx.yaml": "# @package _global_\n" + yaml.safe_dump(body, sort_keys=False)}
    )
    one = member("train", "us", "forest")
    proc = run_pipekit(
        "run",
        "-cd",
        str(conf),
        "pipeline=mx",
        "tracking=off",
        "cache=off",
        "executor=sync",
        "--targets",
        one,
        env=cli_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{one} done" in proc.stderr and "running 2 stages" in proc.stderr
    shown = run_pipekit(
        "show", "-cd", str(conf), "pipeline=mx", "--format", "dot", env=cli_env, cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    assert "&times;6" in shown.stdout


def test_the_live_view_folds_a_matrix_and_links_the_dask_dashboard():
    from pipekit.core.events import StageEvent
    from pipekit.display.live import LiveRun

    p = make(stages())
    live = LiveRun(display=False)
    p.run(executor="sync", progress=False, observers=[live])
    rows = {name: (state, note) for name, state, _, note in live.rows()}
    assert rows["train[...]"] == ("done", "6 done") and rows["compare"][0] == "done"
    assert not any(name.startswith("train[region") for name in rows)
    link = "http://127.0.0.1:8787/status"
    live.stage_changed(StageEvent("data", "running", 0.0, meta={"dashboard": link}))
    assert f'href="{link}"' in live.status.value


# --- foreach over the declared keys of an upstream output -----------------------------------


def keyed(**extra):
    """split (returns the TypedDict Regions: eu, us, apac) -> fit (one member per key) ->
    sizes (fan-in)."""
    found = {
        "split": {"_target_": "keys_stages.split", "params": {"total": 60}},
        "fit": {
            "_target_": "keys_stages.fit",
            "foreach": {"keys_of": "split", "input": "part"},
            "params": {"scale": 2.0},
        },
        "sizes": {"_target_": "scale_stages.collect", "inputs": {"models": "fit[*].size"}},
    }
    found.update(extra)
    return found


def test_foreach_keys_of_expands_one_member_per_declared_key_and_fans_in(tmp_path):
    from pipekit.core.refs import Ref

    p = make(keyed())
    assert p.spec.matrices["fit"] == ("fit[eu]", "fit[us]", "fit[apac]")  # declared order
    us = p.stages["fit[us]"]
    assert us.params == {"scale": 2.0, "item": "us"} and us.matrix == {"item": "us"}
    assert dict(us.inputs) == {"part": Ref("split", "us")}
    assert p.plan("fit[us]") == ["split", "fit[us]"]  # --targets names one member
    assert set(p.plan("fit")) == {"split", *p.spec.matrices["fit"]}
    result = p.run(executor="threads", progress=False)
    assert result.ok, result.errors
    assert result["fit[us]"] == {"region": "us", "size": 40.0}  # split.us == 60 // 3, x2
    assert result["sizes"]["models"] == {"fit[eu]": 60.0, "fit[us]": 40.0, "fit[apac]": 20.0}
    # overrides reach every member, `members:` one of them
    changed = p.with_overrides(["stages.fit.params.scale=1.0"])
    assert {changed.stages[m].params["scale"] for m in changed.spec.matrices["fit"]} == {1.0}
    one = make(
        keyed(
            fit={**keyed()["fit"], "members": [{"where": {"item": "eu"}, "params": {"scale": 0.5}}]}
        )
    )
    assert (
        one.stages["fit[eu]"].params["scale"] == 0.5
        and one.stages["fit[us]"].params["scale"] == 2.0
    )


def test_foreach_keys_of_a_dataclass_output_with_the_default_input_name():
    p = make(
        {
            "halves": {"_target_": "keys_stages.halves", "params": {"n": 6}},
            "fit": {
                "_target_": "keys_stages.fit",
                "foreach": {"keys_of": "halves", "input": "part"},
            },
            "plain": {"_target_": "core_stages.kwargs_ok", "foreach": {"keys_of": "halves"}},
        }
    )
    assert p.spec.matrices["fit"] == ("fit[train]", "fit[test]")  # the dataclass's fields
    result = p.run(executor="sync", progress=False)
    assert result["fit[test]"] == {"region": "test", "size": 3}
    # without `input:` the argument is named after the upstream stage
    assert result["plain[train]"] == ["halves", "item"]


def test_foreach_keys_of_is_drawn_as_one_stacked_node_with_one_edge():
    from pipekit.display.dot import dot_source

    source = dot_source(make(keyed()).spec)
    assert '"fit" [label=<<b>fit</b> &times;3' in source and '"fit[eu]"' not in source
    assert source.count('"split" -> "fit"') == 1 and "part←each key" in source


def test_foreach_keys_of_is_cached_per_member_and_tracked_per_member(tmp_path):
    from mlflow import MlflowClient

    log = tmp_path / "log"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = keyed(
        split={"_target_": "keys_stages.split", "params": {"total": 60, "log": str(log)}},
        fit={**keyed()["fit"], "params": {"scale": 2.0, "log": str(log)}},
    )
    cache = {"backend": "local", "path": str(tmp_path / "cache")}
    first = make(config, cache=cache, tracking={"backend": "local", "uri": uri}).run(
        executor="threads", progress=False
    )
    assert first.ok, first.errors
    runs = MlflowClient(uri).search_runs([first.tracking["mlflow_experiment_id"]])
    members = {r.data.tags["mlflow.runName"]: r for r in runs if "pipekit.matrix" in r.data.tags}
    assert sorted(members) == ["fit[apac]", "fit[eu]", "fit[us]"]
    assert yaml.safe_load(members["fit[eu]"].data.tags["pipekit.member"]) == {"item": "eu"}
    again = make(config, cache=cache).run(executor="sync", progress=False)
    assert set(again.status.values()) == {"cached"}
    one = {**config["fit"], "members": [{"where": {"item": "us"}, "params": {"scale": 3.0}}]}
    third = make({**config, "fit": one}, cache=cache).run(executor="sync", progress=False)
    assert third.status == {
        "split": "cached",
        "fit[eu]": "cached",
        "fit[us]": "done",
        "fit[apac]": "cached",
        "sizes": "done",
    }
    assert sorted(log.read_text().split("\n")[:-1]) == [
        "fit apac", "fit eu", "fit us", "fit us", "split",
    ]  # fmt: skip


def foreach(value, **extra):
    return keyed(fit={"_target_": "keys_stages.fit", "foreach": value, **extra})


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            foreach({"key_of": "split"}),
            UnknownKeyError,
            r"stages\.fit\.foreach: unknown key 'key_of' \(did you mean 'keys_of'\?\)",
        ),
        (foreach({"input": "part"}), ConfigTypeError, r"stages\.fit\.foreach\.keys_of must name"),
        (
            foreach({"keys_of": "splt", "input": "part"}),
            UnknownStageError,
            r"stages\.fit\.foreach\.keys_of refers to unknown stage 'splt' \(did you mean 'split'",
        ),
        (
            foreach({"keys_of": "fit", "input": "part"}),
            MatrixError,
            r"stages\.fit\.foreach\.keys_of: stage 'fit' cannot expand over its own output",
        ),
        (
            keyed(split={"_target_": "keys_stages.split", "foreach": [1, 2]}),
            MatrixError,
            r"stages\.fit\.foreach\.keys_of: 'split' is a matrix stage",
        ),
        (
            keyed(split={"_target_": "keys_stages.untyped"}),
            MatrixError,
            r"stages\.fit\.foreach: the keys of 'split' are not known before it runs: "
            r"keys_stages\.untyped declares no TypedDict or dataclass as its return type; "
            r"annotate it",
        ),
        (
            keyed(split={"_target_": "keys_stages.Maker"}),
            MatrixError,
            r"the keys of 'split' are not known before it runs",
        ),
        (
            keyed(split={"_target_": "keys_stages.nothing"}),
            MatrixError,
            r"stages\.fit\.foreach: 'split' returns Nothing, which declares no keys",
        ),
        (
            keyed(split={"_target_": "keys_stages.partial"}),
            MatrixError,
            r"'split' returns Partial, which may leave out eu, us \(total=False or NotRequired\)",
        ),
        (
            keyed(split={"_target_": "keys_stages.odd"}),
            MatrixError,
            r"key 'a=b' of Odd \(the output of 'split'\) cannot name a member",
        ),
        (
            keyed(split={"_target_": "keys_stages.missing"}),
            TargetImportError,
            r"stages\.fit\.foreach\.keys_of: the keys of 'split' come from the return "
            r"annotation of its _target_ 'keys_stages\.missing', which cannot be imported "
            r"\(AttributeError",
        ),
        (
            foreach({"keys_of": "split", "input": "part"}, params={"part": 1}),
            DuplicateArgumentError,
            r"argument 'part' receives 'split\.<key>' but is also in stages\.fit\.params; "
            r"name another argument with stages\.fit\.foreach\.input=<name>",
        ),
        (
            foreach({"keys_of": "split", "input": "item"}),
            DuplicateArgumentError,
            r"argument 'item' receives 'split\.<key>' but is also the param that holds",
        ),
        (
            foreach({"keys_of": "split", "input": "a-b"}),
            ConfigTypeError,
            r"stages\.fit\.foreach\.input must be the name of the argument",
        ),
        (foreach("split"), ConfigTypeError, r"foreach must be a list of values.*keys_of"),
    ],
)
def test_bad_foreach_keys_of_is_named(config, error, message):
    with pytest.raises(error, match=message):
        make(config).validate()


def test_cli_names_a_bad_keys_of_in_one_line(user_conf, cli_env, tmp_path):
    body = {"name": "kx", "stages": foreach({"keys_of": "splt", "input": "part"})}
    conf = user_conf(
        {"pipeline/kx.yaml": "# @package _global_\n" + yaml.safe_dump(body, sort_keys=False)}
    )
    proc = run_pipekit("validate", "-cd", str(conf), "pipeline=kx", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "pipekit: error: pipeline 'kx': stages.fit.foreach.keys_of refers to unknown stage "
        "'splt' (did you mean 'split'?); name a stage of this pipeline"
    )
    fixed = run_pipekit(
        "run", "-cd", str(conf), "pipeline=kx", "stages.fit.foreach.keys_of=split",
        "tracking=off", "cache=off", "executor=sync", "--targets", "fit[eu]",
        env=cli_env, cwd=tmp_path,
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert "fit[eu] done" in fixed.stderr and "running 2 stages" in fixed.stderr


def test_a_declared_key_missing_from_the_output_fails_its_member_only():
    p = make(keyed(split={"_target_": "keys_stages.liar"}))
    result = p.run(executor="sync", progress=False, raise_on_failure=False)
    assert result.status["fit[eu]"] == result.status["fit[us]"] == "done"
    assert result.status["fit[apac]"] == "failed" and result.status["sizes"] == "skipped"
    assert "wants 'split.apac', but stage 'split' returned no such key" in str(
        result.errors["fit[apac]"]
    )

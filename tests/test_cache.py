"""The stage cache: keys, reuse, resume after failure, force, explain, the store, the CLI."""

from __future__ import annotations

import importlib
import json
import pickle
import sys
import warnings
from pathlib import Path

import pytest
from conftest import make

import pipekit as pk
from pipekit.cache.store import CacheStore, open_store
from pipekit.cli import main
from pipekit.core.events import Observer
from pipekit.core.text import parse_duration, parse_size
from pipekit.errors import CacheConfigError, CacheEntryError, CacheWarning, UnknownStageError

LOCAL = {"backend": "local", "path": ".pipekit/cache"}


def ticking(log: Path, c: float = 1.0, cache: dict | None = None, **top) -> pk.Pipeline:
    """a -> b -> c(param c) -> d, with b -> e: each stage logs its name to `log` when it runs."""

    def stage(name, value=0, **extra):
        body = {"_target_": "tick", "params": {"log": str(log), "name": name, "value": value}}
        body.update(extra)
        return body

    return make(
        {
            "a": stage("a", 1),
            "b": stage("b", inputs={"x": "a"}),
            "c": stage("c", c, inputs={"x": "b"}),
            "d": stage("d", inputs={"x": "c"}),
            "e": stage("e", 10, inputs={"x": "b"}),
        },
        cache=cache or LOCAL,
        **top,
    )


def computed(log: Path) -> list[str]:
    """Stages that ran since the last call (and empties the log)."""
    names = log.read_text().split() if log.exists() else []
    log.write_text("")
    return names


class Recorder(Observer):
    def __init__(self):
        self.events = []

    def stage_changed(self, event):
        if event.state != "pending":
            self.events.append(event)

    def final(self):
        return {e.stage: e for e in self.events if e.state not in ("running",)}


# --- reuse --------------------------------------------------------------------------------


def test_rerun_computes_nothing_and_a_param_change_recomputes_only_descendants(tmp_path):
    log = tmp_path / "log"
    first = ticking(log).run(executor="sync", progress=False)
    assert first.status == dict.fromkeys("abcde", "done")
    assert computed(log) == list("abcde")

    again = ticking(log).run(progress=False)
    assert computed(log) == []
    assert again.status == dict.fromkeys("abcde", "cached")
    assert dict(again) == dict(first) == {"a": 1, "b": 1, "c": 2.0, "d": 2.0, "e": 11}

    changed = ticking(log, c=0.5).run(executor="sync", progress=False)
    assert computed(log) == ["c", "d"]
    assert changed.status == {"a": "cached", "b": "cached", "c": "done", "d": "done", "e": "cached"}
    assert changed.reasons["c"] == "params changed: value 1.0 → 0.5"
    assert changed.reasons["d"] == "upstream changed: c"
    assert changed["d"] == 1.5

    back = ticking(log, c=1.0).run(progress=False)  # the old entries are still there
    assert computed(log) == [] and back["d"] == 2.0


def test_a_failed_stage_resumes_at_the_failure(tmp_path):
    log, broken = tmp_path / "log", tmp_path / "broken"
    broken.write_text("")
    stages = {
        "a": {"_target_": "tick", "params": {"log": str(log), "name": "a", "value": 1}},
        "b": {"_target_": "fail_if", "params": {"path": str(broken)}, "inputs": {"x": "a"}},
        "c": {"_target_": "tick", "params": {"log": str(log), "name": "c"}, "inputs": {"x": "b"}},
    }
    failed = make(stages, cache=LOCAL).run(progress=False, raise_on_failure=False)
    assert failed.status == {"a": "done", "b": "failed", "c": "skipped"}
    assert computed(log) == ["a"]

    broken.unlink()
    resumed = make(stages, cache=LOCAL).run(progress=False)
    assert resumed.status == {"a": "cached", "b": "done", "c": "done"}
    assert computed(log) == ["c"] and resumed["c"] == 2
    assert resumed.reasons["b"] == "no entry"


def test_cache_false_force_and_their_descendants(tmp_path):
    log = tmp_path / "log"
    ticking(log).run(progress=False)
    computed(log)

    forced = ticking(log).run(force=["c"], executor="sync", progress=False)
    assert computed(log) == ["c", "d"]
    assert forced.reasons["c"] == "forced" and forced.reasons["d"] == "upstream forced: c"
    ticking(log).run(force=True, executor="sync", progress=False)
    assert computed(log) == list("abcde")
    with pytest.raises(UnknownStageError, match="did you mean 'c'"):
        ticking(log).run(force=["cc"], progress=False)

    p = ticking(log)
    stages = {name: dict(p.config["stages"][name]) for name in p.stages}
    stages["b"]["cache"] = False
    opted_out = make(stages, cache=LOCAL).run(executor="sync", progress=False)
    # the first run keyed on b's output (early cutoff, docs/caching.md) recomputes below it
    assert sorted(computed(log)) == ["b", "c", "d", "e"]
    assert opted_out.reasons["b"].startswith("cache: false")
    assert opted_out.reasons["e"] == "upstream changed: b"
    again = make(stages, cache=LOCAL).run(executor="sync", progress=False)
    assert computed(log) == ["b"]  # b re-runs; its output is unchanged: c, d, e stay cached
    assert again.reasons["b"] == "cache: false; output unchanged → c, e cached"


def test_load_twice_in_one_kernel_computes_nothing_the_second_time():
    overrides = ["tracking=off", "executor=sync"]
    first = pk.load("cancer", overrides=overrides).run(progress=False)
    second = pk.load("cancer", overrides=overrides).run(progress=False)
    assert set(first.status.values()) == {"done"}
    assert {s for s, state in second.status.items() if state != "cached"} == {"publish"}
    assert second.reasons["publish"] == "cache: false"
    assert second["evaluate"] == first["evaluate"]


def test_cached_outputs_load_only_when_needed(tmp_path):
    log = tmp_path / "log"
    ticking(log).run(progress=False)
    computed(log)
    store = ticking(log).cache_store()
    for key in store.keys():  # break every value file: any load would now fail loudly  # noqa: SIM118
        Path(store.values_dir, f"{key}.pkl").write_bytes(b"not a pickle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CacheWarning: nothing was read
        result = ticking(log).run(progress=False)
    assert set(result.status.values()) == {"cached"} and computed(log) == []
    assert "d" in result and len(result) == 5


def test_cached_events_carry_key_manifest_reason_and_output(tmp_path):
    log = tmp_path / "log"
    ticking(log).run(progress=False)
    recorder = Recorder()
    result = ticking(log, c=2.0).run(observers=[recorder], executor="sync", progress=False)
    final = recorder.final()
    assert final["a"].state == "cached" and final["a"].output == 1
    assert final["a"].reason.startswith("unchanged since")
    manifest = final["a"].meta["manifest"]
    assert manifest["stage"] == "a" and manifest["metrics"] == {}
    assert final["a"].meta["cache_key"] == manifest["key"]
    assert final["c"].state == "done" and final["c"].reason == "params changed: value 1.0 → 2.0"
    assert final["c"].meta["cache_key"] in result.run_id or final["c"].meta["cache_key"]
    running = [e for e in recorder.events if e.state == "running"]
    assert [e.stage for e in running] == ["c", "d"]


# --- keys ---------------------------------------------------------------------------------


def project(tmp_path: Path, helper_body: str, name: str) -> None:
    """A tiny user project on sys.path: `<name>_helpers.py` and `<name>_stages.py`."""
    (tmp_path / f"{name}_helpers.py").write_text(
        f"SCALE = 2\n\n\ndef clean(x):\n    {helper_body}\n\n\nclass Shift:\n"
        f"    def apply(self, x):\n        return x + 1\n"
    )
    (tmp_path / f"{name}_stages.py").write_text(
        f"import {name}_helpers as helpers\nfrom {name}_helpers import Shift\n\n\n"
        f"def direct(x=1):\n    return helpers.clean(x) * helpers.SCALE\n\n\n"
        f"def via_class(x=1):\n    return Shift().apply(x)\n"
    )


def test_editing_a_helper_in_the_project_changes_the_key(tmp_path, monkeypatch):
    name = f"proj{abs(hash(str(tmp_path))) % 10**8}"
    project(tmp_path, "return x + 1", name)
    monkeypatch.syspath_prepend(str(tmp_path))
    stages = {
        "d": {"_target_": f"{name}_stages.direct"},
        "k": {"_target_": f"{name}_stages.via_class"},
    }
    assert make(stages, cache=LOCAL).run(progress=False)["d"] == 4
    assert set(make(stages, cache=LOCAL).explain().cached) == {"d", "k"}

    helpers = sys.modules[f"{name}_helpers"]
    (tmp_path / f"{name}_helpers.py").write_text(
        (tmp_path / f"{name}_helpers.py").read_text().replace("x + 1\n\n", "x + 2\n\n", 1)
    )
    importlib.reload(helpers)
    importlib.reload(sys.modules[f"{name}_stages"])
    plan = make(stages, cache=LOCAL).explain()
    assert plan["d"].action == "run"
    assert plan["d"].reason == "code changed: clean"
    assert plan["k"].action == "cached"  # Shift did not change
    assert make(stages, cache=LOCAL).run(progress=False)["d"] == 6

    helpers.SCALE = 3  # a module constant the stage reads
    assert make(stages, cache=LOCAL).explain()["d"].reason == "code changed: SCALE"


def test_watched_files_are_part_of_the_key(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    stages = {"load": {"_target_": "const", "params": {"value": 3}, "watch": ["*.csv"]}}
    make(stages, cache=LOCAL).run(progress=False)
    assert make(stages, cache=LOCAL).explain()["load"].action == "cached"
    data.write_text("a,b\n1,3\n")
    plan = make(stages, cache=LOCAL).explain()
    assert plan["load"].action == "run"
    assert plan["load"].reason == "watched file changed: data.csv"


def test_explain_names_every_reason_and_runs_nothing(tmp_path):
    log = tmp_path / "log"
    plan = ticking(log).explain()
    assert plan.to_run == list("abcde") and {p.reason for p in plan} == {"no entry"}
    ticking(log).run(progress=False)
    computed(log)
    plan = ticking(log, c=0.5).explain(force=["e"])
    assert [(p.stage, p.action, p.reason) for p in plan][2:] == [
        ("c", "run", "params changed: value 1.0 → 0.5"),
        ("d", "run", "upstream changed: c"),
        ("e", "run", "forced"),
    ]
    assert "3 of 5 stages will run" in str(plan)
    assert computed(log) == []
    off = ticking(log, cache={"backend": "off"}).explain()
    assert {p.reason for p in off} == {"cache off"}


# --- the store ----------------------------------------------------------------------------


def test_entry_layout_manifest_and_last_pointer(tmp_path):
    log = tmp_path / "log"
    ticking(log).run(progress=False)
    root = tmp_path / ".pipekit" / "cache"
    store = CacheStore(str(root))
    assert len(store.keys()) == 5
    manifest = next(m for m in store.entries() if m["stage"] == "c")
    assert manifest["params"] == {"log": str(log), "name": "c", "value": 1.0}
    assert manifest["pipeline"] == "t" and manifest["target"] == "core_stages.tick"
    assert "core_stages.tick" in manifest["code"]
    assert manifest["size"] == (root / "values" / f"{manifest['key']}.pkl").stat().st_size
    assert manifest["pickle"]["library"] == "cloudpickle"
    assert set(manifest["upstream"]) == {"b"}
    assert json.loads((root / "last" / "t" / "c.json").read_text())["key"] == manifest["key"]
    for folder in ("entries", "values"):
        assert not [p for p in (root / folder).iterdir() if p.name.startswith(".tmp-")]


def test_a_truncated_entry_warns_is_recomputed_and_replaced(tmp_path):
    log = tmp_path / "log"
    ticking(log).run(progress=False)
    computed(log)
    store = ticking(log).cache_store()
    key = next(m["key"] for m in store.entries() if m["stage"] == "b")
    value = Path(store.values_dir, f"{key}.pkl")
    value.write_bytes(value.read_bytes()[:-3])

    recorder = Recorder()
    with pytest.warns(CacheWarning, match="stage 'b': cache entry .* recomputing and replacing"):
        result = ticking(log).run(observers=[recorder], executor="sync", progress=False)
    assert computed(log) == ["b"]
    assert result.status["b"] == "done" and result.reasons["b"] == "corrupt entry replaced"
    assert recorder.final()["b"].reason == "corrupt entry replaced"
    assert dict(result) == {"a": 1, "b": 1, "c": 2.0, "d": 2.0, "e": 11}
    assert store.check(key) is None and store.load(key) == 1


def test_a_corrupt_entry_found_while_loading_is_recomputed(tmp_path):
    log = tmp_path / "log"
    ticking(log).run(progress=False)
    computed(log)
    store = ticking(log).cache_store()
    # same size, garbage content: only unpickling notices (a needed input, then a lazy output)
    for stage in ("b", "d"):
        key = next(m["key"] for m in store.entries() if m["stage"] == stage)
        value = Path(store.values_dir, f"{key}.pkl")
        value.write_bytes(b"\x00" * value.stat().st_size)
    with pytest.warns(CacheWarning, match="stage 'b'"):
        result = ticking(log, c=3.0).run(executor="sync", progress=False)
    assert computed(log) == ["b", "c", "d"]
    assert result["d"] == 4.0

    # d's old (c=1.0) entry is garbage too: reading it after the run names the stage and
    # removes the entry, but runs nothing (no hidden pipeline run, no MLflow run)
    result = ticking(log).run(progress=False)
    with pytest.raises(CacheEntryError, match="stage 'd': its cached output is unusable"):
        result["d"]
    assert computed(log) == []
    assert ticking(log).run(progress=False)["d"] == 2.0 and computed(log) == ["d"]


def test_garbage_manifest_is_a_miss(tmp_path):
    log = tmp_path / "log"
    ticking(log).run(progress=False)
    computed(log)
    store = ticking(log).cache_store()
    key = next(m["key"] for m in store.entries() if m["stage"] == "e")
    Path(store.entries_dir, f"{key}.json").write_text("{not json")
    with pytest.warns(CacheWarning, match="unreadable manifest"):
        ticking(log).run(observers=[Recorder()], progress=False)
    assert computed(log) == ["e"] and store.manifest(key)["stage"] == "e"


def test_processes_scheduler_writes_entries_in_the_workers(tmp_path):
    log = tmp_path / "log"
    p = ticking(log, executor={"scheduler": "processes", "num_workers": 2})
    assert p.run(progress=False)["d"] == 2.0
    pickle.loads(pickle.dumps(p.cache_store()))
    assert set(ticking(log).run(progress=False).status.values()) == {"cached"}


@pytest.mark.parametrize("url", ["memory://pipekit-test-{n}", "file://{tmp}/shared"])
def test_fsspec_backend(tmp_path, url):
    url = url.format(n=abs(hash(str(tmp_path))), tmp=tmp_path)
    log = tmp_path / "log"
    cache = {"backend": "fsspec", "url": url}
    ticking(log, cache=cache).run(progress=False)
    again = ticking(log, cache=cache).run(observers=[Recorder()], progress=False)
    assert set(again.status.values()) == {"cached"} and again["e"] == 11
    store = open_store(cache)
    assert len(store.keys()) == 5
    key = next(iter(store.keys()))
    assert store.manifest(key)["key"] == key
    assert not [n for n in store.fs.listdir(store.entries_dir) if n.startswith(".tmp-")]
    if url.startswith("file://"):
        assert (tmp_path / "shared" / "values" / f"{key}.pkl").exists()


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"backend": "lcoal"}, "cache.backend 'lcoal' is unknown (did you mean 'local'?)"),
        ({"backend": "local", "pth": "x"}, "cache.pth is not a setting of the 'local' backend"),
        ({"backend": "fsspec"}, "cache.url must be an fsspec URL"),
    ],
)
def test_bad_cache_settings_are_config_errors(tmp_path, cache, message):
    with pytest.raises(CacheConfigError) as info:
        ticking(tmp_path / "log", cache=cache).run(progress=False)
    assert str(info.value).startswith(f"pipeline 't': {message}")
    assert not (tmp_path / "log").exists()


def test_sizes_and_durations():
    assert parse_size("1GB") == 1 << 30 and parse_size("10k") == 10240 and parse_size("7") == 7
    assert parse_duration("7d") == 7 * 86400 and parse_duration("30m") == 1800
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


# --- the command line ---------------------------------------------------------------------


def test_explain_force_and_cache_commands(tmp_path, capsys, monkeypatch):
    base = ["executor=sync", "tracking=off"]
    assert main(["run", "-q", *base]) == 0
    capsys.readouterr()

    assert main(["explain", *base, "stages.train.params.C=0.5"]) == 0
    out = capsys.readouterr().out
    assert "pipeline 'cancer': 3 of 9 stages will run" in out
    assert "train      run     params changed: C 1.0 → 0.5" in out
    assert "evaluate   run     upstream changed: train" in out

    assert main(["run", "--explain", "--force", "features", *base]) == 0
    out = capsys.readouterr().out
    assert (
        "features   run     forced" in out and "train      run     upstream forced: features" in out
    )

    assert main(["run", *base, "--force", "stages.train.params.C=2"]) == 0  # all, and an override
    err = capsys.readouterr().err
    assert "collect_a done" in err and "(forced)" in err

    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cache {tmp_path}/.pipekit/cache: 10 entries")
    assert "cancer    train" in out

    assert main(["cache", "prune", "--older-than", "soon"]) == 2
    assert "not a duration" in capsys.readouterr().err
    assert main(["cache", "prune", "--max-size", "1k"]) == 0
    assert "left (" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # noqa: SIM115
    assert main(["cache", "clear"]) == 2
    assert "pass --yes to confirm" in capsys.readouterr().err
    assert main(["cache", "clear", "--yes"]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["cache", "ls"]) == 0
    assert "0 entries" in capsys.readouterr().out


# --- tracking -----------------------------------------------------------------------------


def test_cache_hits_are_tagged_and_reuse_registered_model_versions(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from test_tracking import runs_of

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ["executor=sync", "tracking=local", f"tracking.uri={uri}", "cache=local"]
    first = pk.load("cancer", overrides=overrides).run(progress=False)
    second = pk.load("cancer", overrides=overrides).run(progress=False)
    assert second.status["train"] == "cached" and second.status["publish"] == "done"

    _, before = runs_of(uri, "cancer", first.run_id)
    parent, children = runs_of(uri, "cancer", second.run_id)
    assert parent.info.status == "FINISHED"
    for stage in ("collect_a", "split", "features", "train", "evaluate"):
        tags = children[stage].data.tags
        assert tags["pipekit.cache_hit"] == "true"
        assert tags["pipekit.cache_source_run"] == before[stage].info.run_id
    assert "pipekit.cache_hit" not in children["publish"].data.tags
    assert children["train"].data.tags["pipekit.model_version"] == "cancer.train/1"
    client = MlflowClient(uri)
    for model in ("cancer.train", "cancer.features"):
        assert [str(v.version) for v in client.search_model_versions(f"name='{model}'")] == ["1"]
    assert children["evaluate"].data.metrics["roc_auc"] == pytest.approx(
        second["evaluate"]["roc_auc"]
    )
    # MLflow's tags say which version each entry produced: `cache ls` shows it
    store = pk.load("cancer", overrides=overrides).cache_store()
    train = next(m for m in store.entries() if m["stage"] == "train")
    assert client.get_model_version("cancer.train", "1").tags["pipekit.cache_key"] == train["key"]
    assert main(["cache", "ls", "--uri", uri]) == 0
    listed = capsys.readouterr().out
    assert "cancer.train/1" in listed and "cancer.features/1" in listed

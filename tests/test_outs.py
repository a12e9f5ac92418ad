"""Files as stage outputs (`outs`) and early cutoff (`cache: false`, `cache: {ttl: ...}`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make

import pipekit.cache.plan as plan
from pipekit.errors import ConfigTypeError, StageError, UnknownKeyError

LOCAL = {"backend": "local", "path": ".pipekit/cache"}


def ran(log: Path) -> list[str]:
    """Stages that computed since the last call (sorted), emptying the log."""
    names = log.read_text().split() if log.exists() else []
    log.write_text("")
    return sorted(names)


def files(tmp_path: Path, **write_params) -> dict:
    log = str(tmp_path / "log")
    return {
        "w": {
            "_target_": "outs_stages.write",
            "params": {"path": "out/a.txt", "log": log, **write_params},
            "outs": ["out/a.txt"],
        },
        "r": {"_target_": "outs_stages.read", "inputs": {"path": "w"}, "params": {"log": log}},
    }


def test_deleted_outs_recompute_and_are_recreated(tmp_path):
    log = tmp_path / "log"
    make(files(tmp_path), cache=LOCAL).run(progress=False)
    assert ran(log) == ["read", "write"]
    manifest = next(iter(make(files(tmp_path), cache=LOCAL).cache_store().entries()), None)
    assert manifest is not None
    assert make(files(tmp_path), cache=LOCAL).run(progress=False).status == {
        "w": "cached",
        "r": "cached",
    }

    Path("out/a.txt").unlink()
    explained = make(files(tmp_path), cache=LOCAL).explain()
    assert explained["w"].action == "run"
    assert explained["w"].reason == "outs changed: out/a.txt missing"
    assert explained["r"].action == "cached"  # predicted: w restores what its entry recorded
    again = make(files(tmp_path), cache=LOCAL).run(progress=False)
    assert again.status == {"w": "done", "r": "cached"}  # same content: r keeps its entry
    assert again.reasons["w"] == "outs changed: out/a.txt missing"
    assert Path("out/a.txt").read_text() == "hello"
    assert ran(log) == ["write"]


def test_a_changed_out_file_recomputes_the_stage_and_downstream(tmp_path):
    log = tmp_path / "log"
    stages = files(tmp_path, counter=str(tmp_path / "counter"))  # each write differs
    first = make(stages, cache=LOCAL).run(progress=False)
    assert first["r"] == "hello 1" and ran(log) == ["read", "write"]

    Path("out/a.txt").write_text("edited by hand")
    explained = make(stages, cache=LOCAL).explain()
    assert explained["w"].reason == "outs changed: out/a.txt changed"
    again = make(stages, cache=LOCAL).run(progress=False)
    assert again.status == {"w": "done", "r": "done"}
    assert again["r"] == "hello 2" and again.reasons["r"] == "upstream changed: w"
    assert make(stages, cache=LOCAL).run(progress=False).status == {"w": "cached", "r": "cached"}


def test_a_directory_out_counts_every_file_under_it(tmp_path):
    log = tmp_path / "log"
    stages = files(tmp_path)
    stages["w"]["outs"] = ["out/"]
    make(stages, cache=LOCAL).run(progress=False)
    Path("out/extra.txt").write_text("stray")
    explained = make(stages, cache=LOCAL).explain()
    assert explained["w"].reason == "outs changed: out/extra.txt new"
    ran(log)


def test_a_failed_stage_leaves_no_entry_and_half_files_do_not_match(tmp_path):
    log, flag = tmp_path / "log", tmp_path / "flag"
    stages = {
        "h": {
            "_target_": "outs_stages.half",
            "params": {"path": "out/h.txt", "log": str(log), "flag": str(flag)},
            "outs": ["out/h.txt"],
        }
    }
    flag.write_text("")
    failed = make(stages, cache=LOCAL).run(progress=False, raise_on_failure=False)
    assert failed.status == {"h": "failed"} and Path("out/h.txt").read_text() == "hal"
    store = make(stages, cache=LOCAL).cache_store()
    assert store.keys() == set()  # no entry for a failed stage

    flag.unlink()
    assert make(stages, cache=LOCAL).run(progress=False).status == {"h": "done"}
    assert Path("out/h.txt").read_text() == "whole"

    # the stage fails again after writing half the file over a good entry's output
    flag.write_text("")
    Path("out/h.txt").unlink()
    with pytest.raises(StageError, match="crashed after writing half"):
        make(stages, cache=LOCAL).run(progress=False)
    flag.unlink()
    explained = make(stages, cache=LOCAL).explain()
    assert explained["h"].reason == "outs changed: out/h.txt changed"
    assert make(stages, cache=LOCAL).run(progress=False).status == {"h": "done"}
    assert Path("out/h.txt").read_text() == "whole"


def always(tmp_path: Path, cache) -> dict:
    log = str(tmp_path / "log")
    return {
        "s": {
            "_target_": "outs_stages.source",
            "params": {"path": str(tmp_path / "in.txt"), "log": log},
            "cache": cache,
        },
        "u": {"_target_": "outs_stages.use", "inputs": {"text": "s"}, "params": {"log": log}},
    }


def test_early_cutoff_with_cache_false(tmp_path):
    log = tmp_path / "log"
    (tmp_path / "in.txt").write_text("a")
    stages = always(tmp_path, False)
    first = make(stages, cache=LOCAL).run(progress=False)
    assert first["u"] == "A" and ran(log) == ["source", "use"]

    explained = make(stages, cache=LOCAL).explain()
    assert explained["s"].reason == (
        "cache: false (always runs; descendants cached if its output is unchanged)"
    )
    assert explained["u"].action == "cached"
    again = make(stages, cache=LOCAL).run(progress=False)
    assert again.status == {"s": "done", "u": "cached"} and again["u"] == "A"
    assert again.reasons["s"] == "cache: false; output unchanged → u cached"
    assert ran(log) == ["source"]

    (tmp_path / "in.txt").write_text("b")
    changed = make(stages, cache=LOCAL).run(progress=False)
    assert changed.status == {"s": "done", "u": "done"} and changed["u"] == "B"
    assert changed.reasons["s"] == "cache: false; output changed"
    assert changed.reasons["u"] == "upstream changed: s"


def test_early_cutoff_with_a_ttl(tmp_path, monkeypatch):
    log = tmp_path / "log"
    (tmp_path / "in.txt").write_text("a")
    stages = always(tmp_path, {"ttl": "1m"})
    make(stages, cache=LOCAL).run(progress=False)
    assert ran(log) == ["source", "use"]
    fresh = make(stages, cache=LOCAL).run(progress=False)
    assert fresh.status == {"s": "cached", "u": "cached"} and ran(log) == []

    clock = plan.now()
    monkeypatch.setattr(plan, "now", lambda: clock + 120)  # two minutes later
    explained = make(stages, cache=LOCAL).explain()
    assert explained["s"].reason == (
        "expired: computed 2m ago (ttl 1m); descendants cached if its output is unchanged"
    )
    expired = make(stages, cache=LOCAL).run(progress=False)
    assert expired.status == {"s": "done", "u": "cached"} and ran(log) == ["source"]
    assert expired.reasons["s"] == "expired: computed 2m ago (ttl 1m); output unchanged → u cached"

    (tmp_path / "in.txt").write_text("b")
    monkeypatch.setattr(plan, "now", lambda: clock + 600)
    changed = make(stages, cache=LOCAL).run(progress=False)
    assert changed.status == {"s": "done", "u": "done"} and changed["u"] == "B"


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({"cache": {"ttl": "soon"}}, ConfigTypeError, r"stages\.s\.cache\.ttl must be a positive"),
        ({"cache": {"ttl": 0}}, ConfigTypeError, r"stages\.s\.cache\.ttl must be a positive"),
        ({"cache": {"tll": "5m"}}, UnknownKeyError, r"stages\.s\.cache.*did you mean 'ttl'"),
        ({"cache": "sometimes"}, ConfigTypeError, r"stages\.s\.cache must be true, false or"),
        ({"outs": ["data/*.csv"]}, ConfigTypeError, r"stages\.s\.outs .*no globs"),
        ({"outs": "data.csv"}, ConfigTypeError, r"stage 's' outs must be a list"),
        ({"outs": [3]}, ConfigTypeError, r"stage 's' outs items must be strings"),
    ],
)
def test_bad_cache_and_outs_values_are_named(body, error, message):
    with pytest.raises(error, match=message):
        make({"s": {"_target_": "tick", "params": {"log": "log", "name": "s"}, **body}})


def test_with_a_shared_run_id_an_always_run_stage_runs_once(tmp_path, monkeypatch):
    """Airflow's tasks are runs of `targets=[stage]` sharing PIPEKIT_RUN_ID: the
    `cache: false` stage runs in its own task; a later task of that run id takes its output
    as that task produced it; a new run id runs it again, with early cutoff as usual."""
    log = tmp_path / "log"
    (tmp_path / "in.txt").write_text("a")
    stages = always(tmp_path, False)
    monkeypatch.setenv("PIPEKIT_RUN_ID", "dagrun-1")
    first = make(stages, cache=LOCAL).run(targets=["s"], progress=False)
    assert first.status == {"s": "done"} and ran(log) == ["source"]
    store = make(stages, cache=LOCAL).cache_store()
    assert store.last("t", "s")["run_id"] == "dagrun-1"

    (tmp_path / "in.txt").write_text("b")  # lands after s ran: this run keeps what s read
    second = make(stages, cache=LOCAL).run(targets=["u"], progress=False)
    assert second.status == {"s": "cached", "u": "done"} and second["u"] == "A"
    assert second.reasons["s"] == "already ran in this run (s)"
    assert ran(log) == ["use"]  # s did not run again

    monkeypatch.setenv("PIPEKIT_RUN_ID", "dagrun-2")  # the next DAG run: s runs again
    again = make(stages, cache=LOCAL).run(targets=["s"], progress=False)
    assert again.status == {"s": "done"} and ran(log) == ["source"]
    later = make(stages, cache=LOCAL).run(targets=["u"], progress=False)
    assert later.status == {"s": "cached", "u": "done"} and later["u"] == "B"
    assert later.reasons["u"] == "upstream changed: s" and ran(log) == ["use"]

    monkeypatch.setenv("PIPEKIT_RUN_ID", "dagrun-3")  # no new data: u stays cached
    make(stages, cache=LOCAL).run(targets=["s"], progress=False)
    assert make(stages, cache=LOCAL).run(targets=["u"], progress=False).status == {
        "s": "cached",
        "u": "cached",
    }
    assert ran(log) == ["source"]

    monkeypatch.delenv("PIPEKIT_RUN_ID")  # a local run: s always runs, as before
    local = make(stages, cache=LOCAL).run(targets=["u"], progress=False)
    assert local.status == {"s": "done", "u": "cached"}
    assert local.reasons["s"] == "cache: false; output unchanged → u cached"
    assert ran(log) == ["source"]


def test_a_shared_run_id_reuses_a_ttl_stage_and_never_files_changed_since(tmp_path, monkeypatch):
    """The rule holds for an expired ttl stage too; and a stage whose declared outs changed
    after its task ran runs again rather than hand on a digest its files no longer have."""
    log = tmp_path / "log"
    (tmp_path / "in.txt").write_text("a")
    stages = always(tmp_path, {"ttl": "1m"})
    monkeypatch.setenv("PIPEKIT_RUN_ID", "dagrun-1")
    make(stages, cache=LOCAL).run(targets=["s"], progress=False)
    clock = plan.now()
    monkeypatch.setattr(plan, "now", lambda: clock + 120)  # expired by the next task
    second = make(stages, cache=LOCAL).run(targets=["u"], progress=False)
    assert second.status == {"s": "cached", "u": "done"}
    assert second.reasons["s"] == "already ran in this run (s)"
    assert ran(log) == ["source", "use"]

    written = files(tmp_path)
    written["w"]["cache"] = False
    make(written, cache=LOCAL).run(targets=["w"], progress=False)
    assert make(written, cache=LOCAL).run(targets=["r"], progress=False).status == {
        "w": "cached",
        "r": "done",
    }
    Path("out/a.txt").write_text("edited by hand")
    rerun = make(written, cache=LOCAL).run(targets=["r"], progress=False)
    assert rerun.status["w"] == "done" and rerun.reasons["w"].startswith("cache: false")
    assert Path("out/a.txt").read_text() == "hello"

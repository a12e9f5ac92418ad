"""Retries and timeouts: delay and backoff, `retry_on`, `stage_defaults`, per-attempt
timeouts under every local scheduler, attempts in progress and MLflow, and validation."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
from conftest import make, run_pipekit

import pipekit as pk
from pipekit import errors
from pipekit.display.progress import TextProgress
from pipekit.errors import StageError

ATTEMPTS = "retry_stages.attempts"


def times(log: Path) -> list[float]:
    return [float(line) for line in log.read_text().splitlines()]


def flaky(log: Path, fail_times: int, **keys) -> dict:
    return {"_target_": ATTEMPTS, "params": {"log": str(log), "fail_times": fail_times}, **keys}


@pytest.mark.parametrize("executor", ["sync", "threads"])
def test_retry_waits_delay_times_backoff(tmp_path, executor):
    log = tmp_path / "log"
    p = make({"f": flaky(log, 3, retries=3, retry_delay="0.2s", retry_backoff=2)})
    result = p.run(executor=executor, progress=False)
    assert result["f"] == 4
    stamps = times(log)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(gaps) == 3
    for gap, wanted in zip(gaps, [0.2, 0.4, 0.8], strict=True):  # delay * 2**(n-1)
        assert gap >= wanted


def test_retries_exhausted_fail_with_every_attempt_recorded(tmp_path):
    log = tmp_path / "log"
    p = make({"f": flaky(log, 9, retries=2, retry_delay=0.05)})
    events = []
    p.run(executor="sync", progress=False, observers=[Recorder(events)], raise_on_failure=False)
    assert len(times(log)) == 3
    final = next(e for e in events if e.state == "failed")
    assert (final.attempt, final.attempts) == (3, 3)
    assert final.meta["attempt_errors"] == [
        f"ConnectionError: attempt {n} failed" for n in (1, 2, 3)
    ]
    assert "failed (after 3 attempts): ConnectionError" in str(p.last_result.errors["f"])


def test_retry_on_retries_only_listed_errors(tmp_path):
    listed, other = tmp_path / "listed", tmp_path / "other"
    p = make(
        {
            "net": flaky(listed, 1, retries=2, retry_on=["ConnectionError", "TimeoutError"]),
            "bad": {
                **flaky(other, 5, retries=2, retry_on=["ConnectionError"]),
                "params": {"log": str(other), "fail_times": 5, "error": "ValueError"},
            },
        }
    )
    result = p.run(executor="threads", progress=False, raise_on_failure=False)
    assert result.status == {"net": "done", "bad": "failed"}
    assert len(times(listed)) == 2  # ConnectionError: retried
    assert len(times(other)) == 1  # ValueError (like InvalidParameterError): failed at once
    assert "ValueError: attempt 1 failed" in str(result.errors["bad"])


def test_dotted_retry_on_class_is_resolved(tmp_path):
    log = tmp_path / "log"
    p = make({"f": flaky(log, 1, retries=1, retry_on=["builtins.ConnectionError"])})
    assert p.run(executor="sync", progress=False)["f"] == 2


def test_stage_defaults_apply_and_a_stage_own_value_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    p = make(
        {"a": flaky(a, 2), "b": flaky(b, 2, retries=0)},
        stage_defaults={"retries": 2, "retry_delay": "0.1s", "timeout": "1m"},
    )
    assert p.spec.stages["a"].retries == 2 and p.spec.stages["a"].timeout == 60.0
    assert p.spec.stages["b"].retries == 0 and p.spec.stages["b"].retry_delay == 0.1
    result = p.run(executor="threads", progress=False, raise_on_failure=False)
    assert result.status == {"a": "done", "b": "failed"}
    assert len(times(a)) == 3 and len(times(b)) == 1


@pytest.mark.parametrize("executor", ["sync", "threads", "processes"])
def test_timed_out_stage_fails_while_an_independent_branch_finishes(tmp_path, executor):
    marker = tmp_path / "branch"
    p = make(
        {
            "slow": {"_target_": "retry_stages.hang", "params": {"seconds": 120}, "timeout": "1s"},
            "after_slow": {
                "_target_": "retry_stages.branch",
                "params": {"marker": "x"},
                "after": ["slow"],
            },
            "other": {"_target_": "retry_stages.branch", "params": {"marker": str(marker)}},
        }
    )
    result = p.run(executor=executor, progress=False, raise_on_failure=False)
    assert result.status == {"slow": "failed", "after_slow": "skipped", "other": "done"}
    assert marker.read_text() == "7"
    error = result.errors["slow"]
    assert isinstance(error, errors.StageTimeoutError) and isinstance(error, TimeoutError)
    assert str(error).startswith("pipeline 't': stage 'slow' timed out after 1s")


def test_timeout_counts_per_attempt_and_is_retried(tmp_path):
    p = make(
        {
            "slow": {
                "_target_": "retry_stages.hang",
                "params": {"seconds": 120},
                "timeout": 0.3,
                "retries": 1,
                "retry_on": ["TimeoutError"],
            }
        }
    )
    events = []
    p.run(executor="threads", progress=False, observers=[Recorder(events)], raise_on_failure=False)
    final = events[-1]
    assert final.state == "failed" and (final.attempt, final.attempts) == (2, 2)
    assert "timed out after 0.3s (attempt 2/2)" in str(p.last_result.errors["slow"])


@pytest.mark.parametrize("executor", ["sync", "threads", "processes"])
def test_attempts_show_in_text_progress(tmp_path, executor):
    log = tmp_path / "log"
    p = make({"train": flaky(log, 1, retries=2)})
    out = io.StringIO()
    p.run(executor=executor, progress=False, observers=[TextProgress(out, live=False)])
    line = next(x for x in out.getvalue().splitlines() if " train " in x)
    assert line.startswith("[1/1] train done ") and line.endswith("s (attempt 2/3)")


def test_attempts_and_first_error_in_the_mlflow_stage_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log, bad = tmp_path / "log", tmp_path / "bad"
    p = pk.Pipeline.from_config(
        {
            "name": "t",
            "stages": {"train": flaky(log, 1, retries=2), "never": flaky(bad, 9, retries=1)},
            "executor": {"scheduler": "threads"},
            "tracking": {"backend": "local", "uri": uri},
        }
    )
    with pytest.raises(StageError):
        p.run(progress=False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    found = client.search_runs([exp.experiment_id])
    runs = {r.data.tags.get("pipekit.stage"): r for r in found}
    train, never = runs["train"], runs["never"]
    assert train.info.status == "FINISHED"
    assert train.data.tags["pipekit.attempts"] == "2/3"
    assert train.data.tags["pipekit.first_error"] == "ConnectionError: attempt 1 failed"
    assert never.info.status == "FAILED"
    assert never.data.tags["pipekit.attempts"] == "2/2"
    assert never.data.tags["pipekit.first_error"] == "ConnectionError: attempt 1 failed"
    assert "RUNNING" not in {r.info.status for r in found}


class Recorder(pk.Observer):
    def __init__(self, events):
        self.events = events

    def run_started(self, run):
        pass

    def stage_changed(self, event):
        self.events.append(event)

    def run_finished(self, run, result):
        pass

    def run_interrupted(self, run, error):
        pass


# --- validation: one line from the CLI, exit 2, nothing ran ---------------------------

BAD = {
    "delay": (
        {"retry_delay": "soon"},
        {},
        ["stage 'a' retry_delay must be a duration", "stages.a.retry_delay=5s"],
    ),
    "backoff": ({"retry_backoff": 0.5}, {}, ["stage 'a' retry_backoff must be a number >= 1"]),
    "timeout_zero": ({"timeout": 0}, {}, ["stage 'a' timeout must be a positive duration"]),
    "retries": ({"retries": -1}, {}, ["stage 'a' retries must be an integer >= 0"]),
    "retry_on_unknown": (
        {"retry_on": ["ConectionError"]},
        {},
        [
            "stage 'a' retry_on",
            "'ConectionError' is not a builtin exception",
            "did you mean 'ConnectionError'",
        ],
    ),
    "retry_on_not_exception": (
        {"retry_on": ["os.path.join"]},
        {},
        ["stage 'a' retry_on", "'os.path.join' is not an exception class"],
    ),
    "retry_on_missing_module": (
        {"retry_on": ["nosuchpkg.Timeout"]},
        {},
        ["stage 'a' retry_on", "'nosuchpkg.Timeout' cannot be imported"],
    ),
    "stage_key_typo": (
        {"retry_dealy": "5s"},
        {},
        ["unknown key 'retry_dealy'", "did you mean 'retry_delay'"],
    ),
    "defaults_typo": (
        {},
        {"stage_defaults": {"timout": "5s"}},
        ["unknown key 'stage_defaults.timout'", "did you mean 'timeout'"],
    ),
    "defaults_bad_value": (
        {},
        {"stage_defaults": {"timeout": "forever"}},
        ["stage_defaults.timeout must be a positive duration"],
    ),
    "defaults_not_mapping": ({}, {"stage_defaults": [1]}, ["stage_defaults must be a mapping"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_retry_settings_fail_validation_in_one_line(case, user_conf, cli_env, tmp_path):
    import yaml

    keys, top, fragments = BAD[case]
    marker = tmp_path / "ran"
    pipeline = {
        "name": "t",
        "stages": {
            "a": {"_target_": "retry_stages.branch", "params": {"marker": str(marker)}, **keys}
        },
        **top,
    }
    conf = user_conf({"pipeline/bad.yaml": "# @package _global_\n" + yaml.safe_dump(pipeline)})
    proc = run_pipekit(
        "run",
        "-cd",
        str(conf),
        "pipeline=bad",
        "tracking=off",
        "cache=off",
        env=cli_env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipekit: error: pipeline 't'")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not marker.exists()

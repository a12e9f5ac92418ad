"""Concurrent runs of one pipeline on one machine: the second waits or skips, with real
subprocesses holding a real `flock` (pipekit/runlock.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make, until
from conftest import run_pipekit as pipekit

from pipekit.errors import ConcurrencyConfigError, ConfigTypeError, RunSkipped
from pipekit.runlock import lock_path, run_lock

BOUND = 60.0  # seconds any wait in these tests may take at most


def conf(user_conf, tmp_path: Path) -> Path:
    """A one-stage pipeline whose stage holds the run until the test releases it."""
    return user_conf(
        {
            "pipeline/hold.yaml": "# @package _global_\n"
            "name: hold\n"
            "vars: {who: a}\n"
            "stages:\n"
            "  gate:\n"
            "    _target_: production_stages.gate\n"
            f"    params: {{directory: '{tmp_path}', name: '${{vars.who}}'}}\n"
            "    cache: false\n"
        }
    )


def start(who: str, config: Path, cwd: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    log = open(cwd / f"{who}.log", "w")  # noqa: SIM115 (closed by the child's exit)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipekit.cli",
            "run",
            "-cd",
            str(config),
            "pipeline=hold",
            f"vars.who={who}",
            "tracking=off",
            "executor=sync",
            *extra,
        ],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=BOUND)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_a_second_run_waits_for_the_first(user_conf, cli_env, tmp_path):
    config = conf(user_conf, tmp_path)
    first = start("a", config, tmp_path, cli_env)
    second = None
    try:
        until((tmp_path / "a.started").exists, "run a to start its stage", BOUND)
        (tmp_path / "b.release").write_text("")  # b would finish at once if it ran
        second = start("b", config, tmp_path, cli_env)
        until(
            lambda: "waiting for the previous run" in (tmp_path / "b.log").read_text(), "b", BOUND
        )
        assert not (tmp_path / "b.started").exists()  # b queues; it did not start its stage
        (tmp_path / "a.release").write_text("")
        assert finish(first) == 0, (tmp_path / "a.log").read_text()
        assert finish(second) == 0, (tmp_path / "b.log").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    log = (tmp_path / "b.log").read_text()
    assert f"pipeline 'hold': waiting for the previous run (pid {first.pid} on " in log
    assert "the previous run finished after" in log and "of waiting; starting" in log
    a_done = float((tmp_path / "a.done").read_text())
    assert float((tmp_path / "b.started").read_text()) >= a_done  # b ran after a, not beside it


def test_skip_exits_0_saying_so_and_runs_nothing(user_conf, cli_env, tmp_path):
    config = conf(user_conf, tmp_path)
    first = start("a", config, tmp_path, cli_env)
    try:
        until((tmp_path / "a.started").exists, "run a to start its stage", BOUND)
        (tmp_path / "b.release").write_text("")
        second = pipekit(
            "run",
            "-cd",
            str(config),
            "pipeline=hold",
            "vars.who=b",
            "tracking=off",
            "++concurrency=skip",
            env=cli_env,
            cwd=tmp_path,
            timeout=BOUND,
        )
        assert second.returncode == 0, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines == [
            f"pipekit: pipeline 'hold': skipped: the previous run (pid {first.pid} on "
            + lines[0].split(f"(pid {first.pid} on ", 1)[1]
        ]
        assert "still holds .pipekit/cache/locks/hold.lock; nothing ran" in lines[0]
        assert "error" not in second.stderr
        assert not (tmp_path / "b.started").exists()
    finally:
        (tmp_path / "a.release").write_text("")
        assert finish(first) == 0, (tmp_path / "a.log").read_text()


def test_a_killed_run_leaves_no_stale_lock(user_conf, cli_env, tmp_path):
    config = conf(user_conf, tmp_path)
    first = start("a", config, tmp_path, cli_env)
    try:
        until((tmp_path / "a.started").exists, "run a to start its stage", BOUND)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        finish(first)
    (tmp_path / "b.release").write_text("")
    second = start("b", config, tmp_path, cli_env, "++concurrency=skip")
    assert finish(second) == 0, (tmp_path / "b.log").read_text()
    assert (tmp_path / "b.done").exists()  # the kernel dropped the dead run's lock
    assert (tmp_path / ".pipekit/cache/locks/hold.lock").is_file()


def test_lock_is_per_pipeline_and_cache(tmp_path):
    local = make({"a": {"_target_": "const"}}, name="p", cache={"backend": "local"})
    elsewhere = make(
        {"a": {"_target_": "const"}}, name="p", cache={"backend": "local", "path": "other"}
    )
    other = make({"a": {"_target_": "const"}}, name="q", cache={"backend": "local"})
    uncached = make({"a": {"_target_": "const"}}, name="p")
    assert lock_path(local.spec) == tmp_path / ".pipekit/cache/locks/p.lock"
    assert lock_path(elsewhere.spec) == tmp_path / "other/locks/p.lock"
    assert lock_path(other.spec) == tmp_path / ".pipekit/cache/locks/q.lock"
    assert lock_path(uncached.spec) == tmp_path / ".pipekit/locks/p.lock"


def test_in_process_skip_raises_and_a_nested_run_does_not_deadlock(tmp_path):
    pipeline = make({"a": {"_target_": "const"}}, name="p", concurrency="skip")
    with run_lock(pipeline.spec, say=lambda line: None):
        assert pipeline.run(progress=False)["a"] == 1  # this thread holds it: no self-block
    # another holder (a second open file, as another process would have) makes it skip
    import fcntl

    path = lock_path(pipeline.spec)
    with open(path, "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RunSkipped, match=r"pipeline 'p': skipped: the previous run"):
            pipeline.run(progress=False)
    assert pipeline.run(progress=False)["a"] == 1


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            "sometimes",
            ConcurrencyConfigError,
            "pipeline 'p': concurrency 'sometimes' is unknown; use wait",
        ),
        ("skp", ConcurrencyConfigError, "concurrency 'skp' is unknown (did you mean 'skip'?)"),
        (True, ConfigTypeError, "pipeline 'p': concurrency must be one of wait, skip, got bool"),
    ],
)
def test_bad_concurrency_is_a_config_error(value, error, message):
    pipeline = make({"a": {"_target_": "const"}}, name="p", concurrency=value)
    with pytest.raises(error, match=re.escape(message)):
        pipeline.validate()


def test_bad_concurrency_on_the_command_line_exits_2(cli_env, tmp_path):
    proc = pipekit(
        "run", "pipeline=book", "concurrency=never", "tracking=off", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "pipekit: error: pipeline 'book': concurrency 'never' is unknown; use wait (queue "
        "behind a run still going) or skip (exit without running), e.g. concurrency=skip"
    )
    assert not (tmp_path / "data").exists()  # nothing ran


def test_a_directory_where_no_lock_can_be_made_runs_and_says_so(tmp_path, capsys):
    locks = tmp_path / ".pipekit" / "locks"
    locks.parent.mkdir()
    locks.write_text("a file where the lock folder would go")
    pipeline = make({"a": {"_target_": "const"}}, name="p")
    assert pipeline.run(progress=False)["a"] == 1
    err = capsys.readouterr().err
    assert "pipekit: pipeline 'p': no run lock (.pipekit/locks/p.lock: " in err
    assert "running without one, so a concurrent run is not held back" in err


# --- a merged sweep is one run as far as the lock goes -------------------------------------


def start_sweep(whos: str, config: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`pipekit run -m vars.who=b,c`: one merged graph of a gate stage per job."""
    log = open(cwd / "sweep.log", "w")  # noqa: SIM115 (closed by the child's exit)
    return subprocess.Popen(
        [
            sys.executable, "-m", "pipekit.cli", "run", "-m", "-cd", str(config),
            "pipeline=hold", f"vars.who={whos}", "tracking=off", "executor=sync",
        ],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_merged_sweep_waits_for_a_run_holding_the_lock(user_conf, cli_env, tmp_path):
    config = conf(user_conf, tmp_path)
    first = start("a", config, tmp_path, cli_env)
    sweep = None
    try:
        until((tmp_path / "a.started").exists, "run a to start its stage", BOUND)
        for who in ("b", "c"):  # the sweep's stages would finish at once if they ran
            (tmp_path / f"{who}.release").write_text("")
        sweep = start_sweep("b,c", config, tmp_path, cli_env)
        log = tmp_path / "sweep.log"
        until(lambda: "waiting for the previous run" in log.read_text(), "the sweep to wait", BOUND)
        assert not (tmp_path / "b.started").exists() and not (tmp_path / "c.started").exists()
        (tmp_path / "a.release").write_text("")
        assert finish(first) == 0, (tmp_path / "a.log").read_text()
        assert finish(sweep) == 0, log.read_text()
    finally:
        for process in (first, sweep):
            if process is not None and process.poll() is None:
                process.kill()
    text = (tmp_path / "sweep.log").read_text()
    assert text.count("waiting for the previous run") == 1  # one lock for the whole sweep
    a_done = float((tmp_path / "a.done").read_text())
    for who in ("b", "c"):
        assert float((tmp_path / f"{who}.started").read_text()) >= a_done


def test_a_run_skips_while_a_merged_sweep_holds_the_lock(user_conf, cli_env, tmp_path):
    config = conf(user_conf, tmp_path)
    (tmp_path / "a.release").write_text("")  # a would finish at once if it ran
    sweep = start_sweep("b,c", config, tmp_path, cli_env)
    try:
        started = [tmp_path / "b.started", tmp_path / "c.started"]
        until(lambda: any(p.exists() for p in started), "the sweep to start a job's stage", BOUND)
        other = pipekit(
            "run", "-cd", str(config), "pipeline=hold", "vars.who=a", "tracking=off",
            "++concurrency=skip", env=cli_env, cwd=tmp_path, timeout=BOUND,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert f"skipped: the previous run (pid {sweep.pid} on " in other.stderr
        assert not (tmp_path / "a.started").exists()
        # and a second sweep with concurrency=skip says so and runs nothing, exit 0
        again = pipekit(
            "run", "-m", "-cd", str(config), "pipeline=hold", "vars.who=d,e", "tracking=off",
            "++concurrency=skip", env=cli_env, cwd=tmp_path, timeout=BOUND,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "pipekit: pipeline 'hold': skipped: the previous run" in again.stderr
        assert "error" not in again.stderr and not (tmp_path / "d.started").exists()
    finally:
        for who in ("b", "c"):
            (tmp_path / f"{who}.release").write_text("")
        assert finish(sweep) == 0, (tmp_path / "sweep.log").read_text()
    assert (tmp_path / "b.done").exists() and (tmp_path / "c.done").exists()

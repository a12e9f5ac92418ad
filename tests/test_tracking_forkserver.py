"""The tracking fork server: one per environment, shared by runs, never stale, private.

The server here is the real one (`pipekit.tracking.forkserver.serve` in its own process,
on a real Unix socket); a test's handler in place of the MLflow writer keeps most tests
fast, and the last ones run `pipekit run` through it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from conftest import TESTS, fork_server, pipeline_file, run_pipekit, until

from pipekit.tracking import forkserver

#: `forkserver.connect` appends the socket's path; the watched file comes before it.
ECHO = (
    "import sys; sys.path.insert(0, {tests!r}); import test_tracking_forkserver as t; "
    "t.echo_server(sys.argv[1], float(sys.argv[2]), sys.argv[3])"
)
WARM: list[str] = []


def echo_server(watched: str, warm_up: float, sock: str) -> None:
    """A fork server whose forks echo one line back, prefixed with their working dir and
    whether they were forked warm; with `warm_up` seconds (> 0) of warming up."""
    warm = (lambda: (time.sleep(warm_up), WARM.append("warm"))) if warm_up > 0 else None
    forkserver.serve(Path(sock), lambda: None, _echo, warm, watch=[Path(watched)])


def _echo(conn) -> None:
    line = conn.makefile("rb").readline()
    conn.sendall(os.getcwd().encode() + b" " + (WARM or ["cold"])[0].encode() + b" " + line)


def program(watched: Path, warm_up: float = 0.0) -> list[str]:
    return [sys.executable, "-c", ECHO.format(tests=str(TESTS)), str(watched), str(warm_up)]


def echo(session: forkserver.Session, text: str) -> str:
    assert session.wait_ready()
    session.stdin.write(text.encode() + b"\n")
    session.stdin.flush()
    return session.stdout.readline().decode().strip()


@pytest.fixture
def watched(tmp_path):
    path = tmp_path / "watched.py"
    path.write_text("")
    return path


@pytest.fixture
def runtime(fork_runtime, monkeypatch):
    monkeypatch.setenv(forkserver.DIR_ENV, str(fork_runtime))
    return fork_runtime


def test_one_server_forks_a_process_per_session(runtime, watched):
    first = forkserver.connect(program(watched))
    assert first is not None
    assert echo(first, "hello") == "/ cold hello"  # a fork of the server (its cwd is /)
    server = fork_server(runtime)
    assert server is not None and server.pid not in (first.pid, os.getpid())
    second = forkserver.connect(program(watched))  # the warm path: a fork at once
    assert second is not None and second.pid is not None and second.pid != first.pid
    assert echo(second, "again") == "/ cold again"
    assert fork_server(runtime).pid == server.pid  # the same server
    assert {p.pid for p in server.children()} <= {first.pid, second.pid}
    for session in (first, second):
        assert session.wait(timeout=10) == 0
        session.close()


def test_a_stale_server_retires_and_the_next_client_starts_a_fresh_one(runtime, watched):
    first = forkserver.connect(program(watched))
    assert first is not None and echo(first, "x") == "/ cold x"
    old = fork_server(runtime)
    time.sleep(0.01)
    watched.write_text("changed = True\n")  # e.g. pipekit edited, a package installed
    os.utime(watched, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = forkserver.connect(program(watched))
    assert second is not None and echo(second, "y") == "/ cold y"
    until(lambda: not old.is_running() or old.status() == "zombie", "the stale server exits")
    new = fork_server(runtime)
    assert new is not None and new.pid != old.pid
    assert "code changed; retiring" in forkserver.log_path(second.sock).read_text()


def test_a_warmed_up_successor_takes_over_while_runs_go_on(runtime, watched):
    """Warming up takes seconds: the server forks a successor to do it and goes on
    serving; the successor, once warm, serves the socket and the old server exits."""
    first = forkserver.connect(program(watched, warm_up=2.0))
    assert first is not None and echo(first, "a") == "/ cold a"
    old = fork_server(runtime)
    time.sleep(1.5)  # idle: the successor is warming up now
    during = forkserver.connect(program(watched, warm_up=2.0))
    assert during is not None and echo(during, "b") == "/ cold b"  # at once, by the old one
    log = forkserver.log_path(first.sock)
    until(lambda: "takes over from" in log.read_text(), "the successor takes over")
    until(lambda: fork_server(runtime).pid != old.pid, "the old server exits")
    after = forkserver.connect(program(watched, warm_up=2.0))
    assert after is not None and echo(after, "c") == "/ warm c"
    assert [line for line in log.read_text().splitlines() if " at " in line][1:] == []


def test_retiring_while_warming_up_ends_the_successor_too(runtime, watched):
    session = forkserver.connect(program(watched, warm_up=30.0))
    assert session is not None and echo(session, "a") == "/ cold a"
    server = fork_server(runtime)
    session.wait(timeout=10)

    def successors():
        return [c for c in server.children() if c.pid != session.pid and c.is_running()]

    until(successors, "a successor warming up")
    (successor,) = successors()
    assert forkserver.retire(session.sock)  # answered at once, warming or not
    until(lambda: fork_server(runtime) is None and not successor.is_running(), "both gone")


def test_a_fork_killed_is_reported_as_killed(runtime, watched):
    session = forkserver.connect(program(watched))
    assert session is not None and session.wait_ready()
    assert session.poll() is None
    os.kill(session.pid, signal.SIGKILL)
    assert session.wait(timeout=10) == -signal.SIGKILL  # the server reaped it and says so


def test_a_killed_server_leaves_a_socket_the_next_client_replaces(runtime, watched):
    session = forkserver.connect(program(watched))
    assert session is not None and echo(session, "a") == "/ cold a"
    server = fork_server(runtime)
    server.kill()
    server.wait(timeout=10)
    assert session.sock.exists()  # nobody listens on it any more
    again = forkserver.connect(program(watched))
    assert again is not None and echo(again, "b") == "/ cold b"
    assert fork_server(runtime).pid != server.pid


def test_an_idle_server_exits_and_removes_its_socket(runtime, watched, monkeypatch):
    monkeypatch.setenv(forkserver.IDLE_ENV, "1")
    session = forkserver.connect(program(watched))
    assert session is not None and echo(session, "a") == "/ cold a"
    until(lambda: fork_server(runtime) is None, "the idle server exits")
    assert not session.sock.exists()


def test_retire_stops_the_server(runtime, watched):
    session = forkserver.connect(program(watched))
    assert session is not None and echo(session, "a") == "/ cold a"
    assert forkserver.retire(session.sock)
    until(lambda: fork_server(runtime) is None, "the retired server exits")
    assert not forkserver.retire(session.sock)  # nobody answers now


def test_a_directory_others_may_enter_is_not_used(tmp_path, watched, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv(forkserver.DIR_ENV, str(shared))
    assert forkserver.runtime_dir() is None
    assert forkserver.connect(program(watched)) is None
    assert list(shared.iterdir()) == []  # no server, no socket


# --- `pipekit run` through the fork server ---------------------------------------------------


def one() -> dict:
    return {"one": 1.0}


@pytest.fixture
def one_stage(user_conf, cli_env, fork_runtime):
    """A one-stage pipeline's config dir, and the environment of `pipekit run`s whose
    writers are forks of this test's fork server."""
    conf = user_conf(pipeline_file("one", a="{_target_: test_tracking_forkserver.one}"))
    env = {**cli_env, forkserver.DIR_ENV: str(fork_runtime)}
    return conf, {**env, "PIPEKIT_TRACKING_WRITER": "forkserver"}


def test_pipekit_runs_share_the_server_each_as_its_own_process(one_stage, tmp_path, fork_runtime):
    """Two runs, one server; each fork writes as its run's process would: from the run's
    working directory (relative artifact paths) and with its environment (`USER` is read
    by the writer for the `mlflow.user` tag)."""
    conf, env = one_stage
    for user in ("alice", "bob"):
        cwd = tmp_path / user
        cwd.mkdir()
        args = ["run", "-cd", str(conf), "pipeline=one", "cache=off", "tracking=local"]
        proc = run_pipekit(*args, env={**env, "USER": user}, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["a: one=1"]
        with sqlite3.connect(cwd / "mlflow.db") as con:
            runs = con.execute("SELECT status, artifact_uri FROM runs").fetchall()
            users = {u for (u,) in con.execute("SELECT value FROM tags WHERE key='mlflow.user'")}
        assert [status for status, _ in runs] == ["FINISHED", "FINISHED"]
        assert all(uri.startswith(f"file://{cwd}/") for _, uri in runs), runs
        assert users == {user}
    (log,) = fork_runtime.glob("*.log")
    started = [line for line in log.read_text().splitlines() if " at " in line]
    assert len(started) == 1, log.read_text()  # one server (it may have handed over to
    # a warmed-up fork of itself meanwhile: `pipekit fork server N: warmed up ...`)


def test_a_store_opened_ahead_and_then_deleted_is_created_afresh(one_stage, tmp_path, fork_runtime):
    """The server opens the stores forks used (their engines) ahead of the next run; a
    store deleted meanwhile must not look like one that has its tables."""
    conf, env = one_stage
    db = tmp_path / "store" / "mlflow.db"
    args = ["run", "-cd", str(conf), "pipeline=one", "cache=off", f"tracking.uri=sqlite:///{db}"]
    first = run_pipekit(*args, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (log,) = fork_runtime.glob("*.log")
    until(lambda: f"opened sqlite:///{db} ahead" in log.read_text(), "the store opened ahead")
    for path in db.parent.glob("mlflow.db*"):  # the database, its WAL and its lock
        path.unlink()
    second = run_pipekit(*args, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "tracking failed" not in second.stderr
    with sqlite3.connect(db) as con:
        assert [s for (s,) in con.execute("SELECT status FROM runs")] == ["FINISHED"] * 2

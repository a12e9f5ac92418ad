"""Tracking faults: concurrent store creation, failures that are never silent, network
timeouts, and secrets that never reach the MLflow store. Real MLflow (SQLite in tmp_path),
real `pipekit` subprocesses; the "servers" are 127.0.0.1 ports where nothing listens or
a tiny HTTP server that answers every request with 503."""

from __future__ import annotations

import fcntl
import http.server
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import fork_server, kill_group, mlflow_run_running, pipeline_file, run_pipekit, until

import pipekit as pk
from pipekit.core.redact import (
    MASK,
    is_secret_key,
    redact,
    redact_override,
    redact_overrides,
    scrub,
)
from pipekit.errors import TrackingConfigError, TrackingError, TrackingUnavailableError
from pipekit.tracking import forkserver

# --- stage functions (importable as test_tracking_faults.<name> by `pipekit` subprocesses)


def make_value(value: int = 3) -> int:
    return value


def score(value: int) -> dict:
    return {"score": value * 2.0}


def connect(conn: str, api_key: str, rows: int = 3) -> dict:
    return {"rows": float(rows)}


def leak(conn: str) -> None:
    raise ValueError(f"login refused for password {conn}")


# --- helpers ----------------------------------------------------------------------------

TINY = """# @package _global_
name: tiny
stages:
  make:
    _target_: test_tracking_faults.make_value
    params: {value: 3}
  score:
    _target_: test_tracking_faults.score
    inputs: {value: make}
"""
METRICS_LINE = "score: score=6"


@pytest.fixture
def tiny(user_conf):
    """A user config dir with the 2-stage pipeline `tiny`."""
    return user_conf({"pipeline/tiny.yaml": TINY})


def tiny_run(conf: Path, *overrides: str) -> list[str]:
    return ["run", "-cd", str(conf), "pipeline=tiny", "executor=sync", "cache=off", *overrides]


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def table_names(db: Path) -> set[str]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        return {name for (name,) in rows}


def schema_version(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [v for (v,) in connection.execute("SELECT version_num FROM alembic_version")]


def not_garbage(path: Path) -> Path:
    """A file that is not an SQLite database: opening it as a store fails at once."""
    path.write_text("this is not a database " * 20)
    return path


# --- 1. concurrent first runs into a new store ------------------------------------------


@pytest.mark.timeout(900)  # 8 processes importing MLflow on a 2-core machine
@pytest.mark.parametrize("count", [4, 8])
def test_concurrent_first_runs_into_a_new_store_are_all_tracked(count, tiny, tmp_path, cli_env):
    from mlflow import MlflowClient
    from mlflow.store.db.utils import _get_latest_schema_revision

    db = tmp_path / "shared" / "mlflow.db"
    uri = f"sqlite:///{db}"
    args = [sys.executable, "-m", "pipekit.cli", *tiny_run(tiny, "tracking=local")]
    procs = []
    for index in range(count):
        cwd = tmp_path / f"job{index}"
        cwd.mkdir()
        procs.append(
            subprocess.Popen(
                [*args, f"tracking.uri={uri}"],
                cwd=cwd,
                env=cli_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    deadline = time.monotonic() + 600
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    parents_said = set()
    for code, out, err in outputs:
        assert code == 0, err
        assert out.splitlines() == [METRICS_LINE], out  # warnings never on stdout
        assert "tracking failed" not in err and "pipekit tracking:" not in err, err
        line = [x for x in err.splitlines() if x.startswith("pipekit: tracked in MLflow run ")]
        assert len(line) == 1, err
        parents_said.add(line[0].split()[5])
    assert not {t for t in table_names(db) if t.startswith("_alembic_tmp")}
    assert schema_version(db) == [_get_latest_schema_revision()]
    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], max_results=1000
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert {r.info.run_id for r in parents} == parents_said and len(parents) == count
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(runs) == 3 * count  # each parent with its 2 stage runs


def test_a_store_lock_held_too_long_is_a_clear_error(tmp_path, monkeypatch):
    from pipekit.tracking import client as tracking_client

    db = tmp_path / "mlflow.db"
    lock = tmp_path / "mlflow.db.lock"
    monkeypatch.setattr(tracking_client, "LOCK_WAIT", 0.3)
    with open(lock, "w") as held:  # another open file description: flock conflicts
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TrackingUnavailableError) as caught:
            tracking_client.client_for(f"sqlite:///{db}")
    message = str(caught.value)
    assert str(lock) in message and "0.3 s" in message and "fuser" in message
    client = tracking_client.client_for(f"sqlite:///{db}")  # released: it opens
    assert client.search_experiments()  # the default experiment exists


# --- 2. tracking failures are never silent ----------------------------------------------


def test_a_failed_tracking_says_so_in_the_closing_line_and_stdout_stays_clean(
    tiny, tmp_path, cli_env
):
    broken = not_garbage(tmp_path / "broken.db")
    proc = run_pipekit(
        *tiny_run(tiny, "tracking=local", f"tracking.uri=sqlite:///{broken}"),
        env=cli_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr  # on_error=warn (the default): the run passes
    assert proc.stdout.splitlines() == [METRICS_LINE]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipekit: tracking failed: DatabaseError: ")
    assert "file is not a database" in last
    assert last.endswith("; the run's results are not in MLflow")
    assert "pipekit tracking: DatabaseError" in proc.stderr  # the warning, via logging
    assert "Traceback" not in proc.stderr


def test_on_error_fail_makes_the_cli_exit_1_after_the_stages_ran(tiny, tmp_path, cli_env):
    broken = not_garbage(tmp_path / "broken.db")
    overrides = ["tracking=local", f"tracking.uri=sqlite:///{broken}", "tracking.on_error=fail"]
    proc = run_pipekit(*tiny_run(tiny, *overrides), env=cli_env, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [METRICS_LINE]  # the stages ran
    assert "pipekit: tracking failed: DatabaseError" in proc.stderr
    quiet = run_pipekit(*tiny_run(tiny, *overrides), "-q", env=cli_env, cwd=tmp_path)
    assert quiet.returncode == 1 and "pipekit: tracking failed:" in quiet.stderr


def test_on_error_fail_raises_after_the_run_in_python(tmp_path):
    from pipekit.errors import TrackingFailedError

    broken = not_garbage(tmp_path / "broken.db")
    tracking = {"backend": "local", "uri": f"sqlite:///{broken}", "on_error": "fail"}
    pipeline = pk.Pipeline.from_config(
        {
            "name": "tiny",
            "stages": {
                "make": {"_target_": "test_tracking_faults.make_value"},
                "score": {"_target_": "test_tracking_faults.score", "inputs": {"value": "make"}},
            },
            "tracking": tracking,
        }
    )
    with pytest.raises(TrackingFailedError) as caught:
        pipeline.run(progress=False)
    assert isinstance(caught.value, TrackingError)
    assert caught.value.result["score"] == {"score": 6.0}  # the run itself passed
    assert "file is not a database" in str(caught.value)
    warned = pipeline.with_overrides(["tracking.on_error=warn"]).run(progress=False)
    assert warned.ok and "file is not a database" in warned.tracking["tracking_error"]
    assert "mlflow_run_id" not in warned.tracking


def test_on_error_is_checked_like_every_tracking_key(tiny, tmp_path, cli_env):
    proc = run_pipekit(
        *tiny_run(tiny, "tracking=local", "tracking.on_error=fial"), env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "tracking.on_error 'fial' is unknown (did you mean 'fail'?)" in proc.stderr
    assert "warn, fail" in proc.stderr
    with pytest.raises(TrackingConfigError, match=r"tracking\.on_error"):
        pk.Pipeline.from_config(
            {
                "name": "t",
                "stages": {"a": {"_target_": "test_tracking_faults.make_value"}},
                "tracking": {"backend": "local", "on_error": True},
            }
        ).run(progress=False)


# --- 3. timeouts on every network call ---------------------------------------------------


def test_lineage_against_nothing_listening_fails_at_once_naming_the_url(tmp_path, cli_env):
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_pipekit("lineage", "m", "--uri", url, env=cli_env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"pipekit: error: MLflow server {url} is unreachable (connection refused); start the "
        f"server, or check the URI (tracking.uri, --uri or MLFLOW_TRACKING_URI)"
    ]


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """Every request: 503 (a server that is up but failing; MLflow retries these)."""

    def _answer(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_lineage_against_a_failing_server_gives_up_after_few_retries(
    failing_server, tmp_path, cli_env
):
    """MLflow's defaults retry a 503 seven times with doubling waits (minutes); pipekit's
    own calls are bounded by MLFLOW_HTTP_REQUEST_MAX_RETRIES/BACKOFF (the 60 s timeout
    of the subprocess is the bound here, not a speed claim)."""
    env = {k: v for k, v in cli_env.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    proc = run_pipekit("lineage", "m", "--uri", failing_server, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pipekit: error: MLflow at {failing_server}")
    assert "Traceback" not in proc.stderr


def test_run_against_a_failing_server_ends_with_the_tracking_failed_line(
    failing_server, tiny, tmp_path, cli_env
):
    env = {k: v for k, v in cli_env.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    overrides = ["tracking=server", f"tracking.uri={failing_server}"]
    proc = run_pipekit(*tiny_run(tiny, *overrides), env=env, cwd=tmp_path, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [METRICS_LINE]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"pipekit: tracking failed: MlflowException: API request to {failing_server}"
    )
    assert last.endswith("; the run's results are not in MLflow")


def test_http_limits_are_set_only_while_pipekit_calls_and_never_override_the_user(
    monkeypatch,
):
    from pipekit.tracking.client import HTTP_LIMITS, http_limits

    for name in HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    with http_limits():
        with http_limits():  # nested (writer thread + lineage): still set
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"  # the user's value wins
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"


def test_run_against_an_unreachable_server_runs_the_stages_and_says_tracking_failed(
    tiny, tmp_path, cli_env
):
    url = f"http://127.0.0.1:{free_port()}"
    overrides = ["tracking=server", f"tracking.uri={url}"]
    proc = run_pipekit(*tiny_run(tiny, *overrides), env=cli_env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [METRICS_LINE]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pipekit: tracking failed: MLflow server {url} is unreachable (connection refused); "
        f"start the server, or check the URI (tracking.uri, --uri or MLFLOW_TRACKING_URI); "
        f"the run's results are not in MLflow"
    )
    failed = run_pipekit(
        *tiny_run(tiny, *overrides, "tracking.on_error=fail"),
        env=cli_env,
        cwd=tmp_path,
        timeout=120,
    )
    assert failed.returncode == 1 and failed.stdout.splitlines() == [METRICS_LINE]


# --- 4. secrets never reach the MLflow store ---------------------------------------------

SECRET_PIPELINE = """# @package _global_
name: vault
stages:
  use:
    _target_: test_tracking_faults.connect
    params: {conn: "${vars.db_password}", api_key: sk-live-0123456789, rows: 3}
  leak:
    _target_: test_tracking_faults.leak
    params: {conn: "${vars.db_password}"}
"""
SECRETS = (b"hunter2", b"AKIAIOSFODNN7EXAMPLE", b"sk-live-0123456789")


def test_secrets_appear_nowhere_in_the_mlflow_store(user_conf, tmp_path, cli_env):
    from mlflow import MlflowClient

    conf = user_conf({"pipeline/vault.yaml": SECRET_PIPELINE})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_pipekit(
        "run",
        "-cd",
        str(conf),
        "pipeline=vault",
        "executor=sync",
        "tracking=local",
        f"tracking.uri={uri}",
        "+vars.db_password=hunter2",
        "cache=fsspec",
        f"cache.url=file://{tmp_path}/cache",
        "++cache.options={key: AKIAIOSFODNN7EXAMPLE}",  # `++`: Hydra adds the new key
        env=cli_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr  # `leak` fails, with the password in its error
    assert proc.stdout.splitlines() == ["use: rows=3"]
    store_files = [tmp_path / name for name in os.listdir(tmp_path) if name.startswith("mlflow")]
    store_files += [p for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in store_files)
    assert any(p.name == "traceback.txt" for p in store_files)
    for path in store_files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret not in data, f"{secret!r} in {path}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vault").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    overrides = parent.data.tags["pipekit.overrides"]
    assert "+vars.db_password=***" in overrides and "++cache.options=***" in overrides
    assert parent.data.params["use.api_key"] == MASK and parent.data.params["use.conn"] == MASK
    assert parent.data.params["use.rows"] == "3"  # the rest stays readable
    leak_run = next(r for r in runs if r.data.tags.get("mlflow.runName") == "leak")
    assert leak_run.data.tags["pipekit.error"] == "ValueError: login refused for password ***"
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    config = (artifacts / "config.yaml").read_text()
    assert "db_password: '***'" in config and "key: '***'" in config
    for secret in SECRETS:  # nor in what the run printed about itself
        assert secret.decode() not in proc.stdout


@pytest.mark.parametrize(
    "key, secret",
    [
        ("password", True),
        ("db_password", True),
        ("passwd", True),
        ("githubToken", True),
        ("client_secret", True),
        ("key", True),
        ("api_key", True),
        ("accessKey", True),
        ("AWS_ACCESS_KEY_ID", True),
        ("keys", False),
        ("key_col", False),
        ("monkey", False),
        ("sort_keys", False),
        ("max_tokens", False),
        ("tokenizer", False),
        ("C", False),
    ],
)
def test_the_secret_key_rule(key, secret):
    assert is_secret_key(key) is secret


def test_redact_masks_values_not_keys_and_scrubs_copies_and_url_passwords():
    config = {
        "vars": {"db_password": "hunter2", "n": 3, "token": None},
        "cache": {"backend": "fsspec", "url": "s3://me:pw123@host/b", "options": {"anon": False}},
        "stages": {"a": {"params": {"dsn": "postgres://u@h/db?pw=hunter2", "keys": ["x"]}}},
    }
    shown = redact(config)
    assert shown["vars"] == {"db_password": MASK, "n": 3, "token": None}
    assert shown["cache"]["url"] == "s3://me:***@host/b"
    assert shown["cache"]["options"] == {"anon": MASK}
    assert shown["stages"]["a"]["params"] == {"dsn": "postgres://u@h/db?pw=***", "keys": ["x"]}
    assert config["vars"]["db_password"] == "hunter2"  # a copy
    assert scrub("http://user:s3cret@host:5000/x") == "http://user:***@host:5000/x"


@pytest.mark.parametrize(
    "override, shown",
    [
        ("+vars.db_password=hunter2", "+vars.db_password=***"),
        ("cache.options={key: AKIA1234}", "cache.options=***"),
        ("cache.options={}", "cache.options={}"),
        ("++cache.options.anon=true", "++cache.options.anon=***"),
        ("stages.a.params={api_key: x, n: 1}", "stages.a.params=***"),
        ("stages.a.params.C=0.5", "stages.a.params.C=0.5"),
        ("~vars.db_password", "~vars.db_password"),
        ("pipeline=wine", "pipeline=wine"),
    ],
)
def test_overrides_are_redacted(override, shown):
    assert redact_override(override) == shown


def test_a_secret_copied_into_another_override_is_scrubbed():
    config = {"vars": {"db_password": "hunter2"}}
    assert redact_overrides(["stages.a.params.conn=hunter2"], config) == [
        "stages.a.params.conn=***"
    ]


def test_explain_says_a_secret_param_changed_without_printing_it(tmp_path):
    stages = {
        "use": {
            "_target_": "test_tracking_faults.connect",
            "params": {"conn": "db", "api_key": "sk-old-0123456789"},
        }
    }
    cache = {"backend": "local", "path": str(tmp_path / "cache")}
    pipeline = pk.Pipeline.from_config({"name": "vault", "stages": stages, "cache": cache})
    pipeline.run(progress=False)
    changed = pipeline.with_overrides(["stages.use.params.api_key=sk-new-9876543210"])
    shown = str(changed.explain())
    assert "params changed: api_key *** → ***" in shown
    assert "sk-old" not in shown and "sk-new" not in shown


def unpicklable() -> dict:
    return {"lock": threading.Lock()}


def test_a_partly_tracked_run_says_which_mlflow_run_is_incomplete(user_conf, tmp_path, cli_env):
    """The parent run exists but a model could not be logged: the closing line names it."""
    conf = user_conf(
        pipeline_file("part", m="{_target_: test_tracking_faults.unpicklable, model: true}")
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", "-cd", str(conf), "pipeline=part", "executor=sync", "cache=off"]
    proc = run_pipekit(*args, f"tracking.uri={uri}", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    run_id = lines[-2].removeprefix("pipekit: tracked in MLflow run ").split()[0]
    assert lines[-1].startswith("pipekit: tracking failed: m: model not logged: ")
    assert lines[-1].endswith(f"; the run's results are incomplete in MLflow run {run_id}")


# --- 5. lineage reads a local store without importing MLflow ------------------------------


def test_lineage_of_a_local_store_reads_sqlite_directly_with_mlflows_answers(tmp_path):
    from pipekit.tracking.client import client_for
    from pipekit.tracking.lineage import _MlflowRegistry, _SqliteRegistry, _walk

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"tracking.uri={uri}", "executor=sync", "cache=off"]
    pk.load("cancer", overrides=overrides).run(progress=False)
    pk.load("cancer", overrides=[*overrides, "stages.train.params.C=0.5"]).run(progress=False)
    slow = _MlflowRegistry(client_for(uri))
    queries = [
        ("cancer.train", None),
        ("cancer.train", "1"),
        ("cancer.train", "@champion"),
        ("cancer.features", None),
    ]
    with _SqliteRegistry.open(uri) as fast:
        assert isinstance(fast, _SqliteRegistry)
        assert sorted(fast.models()) == sorted(slow.models())
        for model, version in queries:
            assert (
                _walk(fast, model, version, uri).to_dict()
                == _walk(slow, model, version, uri).to_dict()
            )
    code = (
        "import sys, pipekit as pk\n"
        f"chain = pk.lineage('cancer.train@champion', uri={uri!r})\n"
        "print(chain.root, len(chain), 'mlflow' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cancer.train/2", "2", "False"]


# --- 6. the writer process of `pipekit run`: killed on either side, nothing stays RUNNING --


def gate(directory: str, x: int = 0) -> dict:
    """Writes `gate.pid`, then waits (at most 2 minutes) for the file `go`: the test acts
    on the processes while this stage's MLflow run is RUNNING."""
    Path(directory, "gate.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not Path(directory, "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"passed": 1.0}


#: A pipeline of `probe` alone (tests of the CLI and of Airflow tasks use it).
PROBE = pipeline_file("probe", probe="{_target_: test_tracking_faults.probe}")


def probe() -> dict:
    """Whether the process running the stages (the driver) has imported MLflow."""
    return {"mlflow_in_driver": float("mlflow" in sys.modules)}


def gated(user_conf, directory: Path) -> Path:
    return user_conf(
        pipeline_file(
            "gated",
            first="{_target_: test_tracking_faults.make_value, params: {value: 3}}",
            gate="{_target_: test_tracking_faults.gate, inputs: {x: first}, "
            f"params: {{directory: '{directory}'}}}}",
            after="{_target_: test_tracking_faults.score, inputs: {value: first}, after: [gate]}",
        )
    )


def start_gated(conf: Path, uri: str, env: dict, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipekit.cli", "run", "-cd", str(conf), "pipeline=gated"]
    return subprocess.Popen(
        [*command, "executor=sync", "cache=off", "tracking=local", f"tracking.uri={uri}"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job has
    )


def run_statuses(db: Path) -> dict[str, tuple[str, str | None]]:
    """MLflow run name -> (status, `pipekit.error` tag), read from the store's tables."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        rows = con.execute(
            "SELECT r.name, r.status, t.value FROM runs r LEFT JOIN tags t "
            "ON t.run_uuid = r.run_uuid AND t.key = 'pipekit.error'"
        ).fetchall()
    return {name: (status, error) for name, status, error in rows}


def parent_ids(db: Path) -> list[str]:
    """The MLflow run ids of the parent runs (those without `mlflow.parentRunId`)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        rows = con.execute(
            "SELECT run_uuid FROM runs WHERE run_uuid NOT IN "
            "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId') ORDER BY start_time"
        ).fetchall()
    return [run_id for (run_id,) in rows]


#: The two kinds of writer process of `pipekit run` (PIPEKIT_TRACKING_WRITER).
MODES = ["process", "forkserver"]


def writer_env(cli_env: dict, mode: str, runtime: Path) -> dict:
    return {**cli_env, "PIPEKIT_TRACKING_WRITER": mode, "PIPEKIT_RUNTIME_DIR": str(runtime)}


def writer_process(proc: subprocess.Popen, mode: str, runtime: Path):
    """The process writing the run's MLflow calls: the driver's child, or a fork of the
    fork server (not the driver's child: the server's)."""
    import psutil

    if mode == "forkserver":
        server = fork_server(runtime)
        assert server is not None, "no fork server"
        children = server.children()  # a run's fork is a session leader, a successor
        found = [c for c in children if os.getsid(c.pid) == c.pid]  # warming up is not
    else:
        children = psutil.Process(proc.pid).children(recursive=True)
        found = [c for c in children if "pipekit.tracking.writer" in " ".join(c.cmdline())]
    assert len(found) == 1, [c.cmdline() for c in children]
    return found[0]


def gone(process) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("mode", MODES)
def test_a_driver_killed_mid_run_leaves_no_mlflow_run_running(
    user_conf, tmp_path, cli_env, mode, fork_runtime
):
    db = tmp_path / "mlflow.db"
    conf = gated(user_conf, tmp_path)
    cli_env = writer_env(cli_env, mode, fork_runtime)
    proc = start_gated(conf, f"sqlite:///{db}", cli_env, tmp_path)
    try:
        mlflow_run_running(db, "gate", proc)
        writer = writer_process(proc, mode, fork_runtime)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole process group
        proc.wait(timeout=30)
        until(lambda: gone(writer), "the writer process exits after ending the runs", 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    statuses = run_statuses(db)
    assert "RUNNING" not in {status for status, _error in statuses.values()}, statuses
    killed = ("KILLED", "interrupted (the pipekit process was killed)")
    assert statuses.pop("gate") == killed
    assert statuses.pop("first") == ("FINISHED", None)
    assert "after" not in statuses  # never started
    assert list(statuses.values()) == [killed]  # the parent run
    (tmp_path / "go").touch()  # the next run is unaffected
    again = start_gated(conf, f"sqlite:///{db}", cli_env, tmp_path)
    _out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    assert "tracking failed" not in err
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        counts = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status"))
    assert counts == {"KILLED": 2, "FINISHED": 1 + 4}  # the second run: parent and 3 stages


@pytest.mark.parametrize("mode", MODES)
def test_a_writer_process_killed_mid_run_ends_the_runs_and_says_so(
    user_conf, tmp_path, cli_env, mode, fork_runtime
):
    db = tmp_path / "mlflow.db"
    cli_env = writer_env(cli_env, mode, fork_runtime)
    proc = start_gated(gated(user_conf, tmp_path), f"sqlite:///{db}", cli_env, tmp_path)
    try:
        mlflow_run_running(db, "gate", proc)
        writer = writer_process(proc, mode, fork_runtime)
        writer.kill()
        until(lambda: gone(writer), "the writer process ends", 30)
        (tmp_path / "go").touch()  # the stages go on
        out, err = proc.communicate(timeout=180)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err  # tracking.on_error=warn: the stages passed
    assert out.splitlines() == ["gate: passed=1", "after: score=6"]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    said = "the tracking writer process ended before the run's MLflow calls (killed by SIGKILL)"
    assert last.startswith(f"pipekit: tracking failed: {said}"), err
    (parent,) = parent_ids(db)
    assert last.endswith(f"; the run's results are incomplete in MLflow run {parent}"), last
    statuses = run_statuses(db)
    assert "RUNNING" not in {status for status, _error in statuses.values()}, statuses
    status, error = statuses.pop("gate")
    assert status == "FAILED" and error.startswith(f"TrackingWriterError: {said}")
    assert statuses.pop("first") == ("FINISHED", None)
    ((name, (status, _error)),) = statuses.items()  # `after` ran once the writer was gone:
    assert name.startswith("gated-") and status == "FAILED"  # it has no run; the parent


def test_the_fork_server_killed_mid_run_cuts_nothing_short(
    user_conf, tmp_path, cli_env, fork_runtime
):
    """The server holds no run: its fork (a session of its own) tracks the run to the
    end, and the next run starts a new server."""
    db = tmp_path / "mlflow.db"
    cli_env = writer_env(cli_env, "forkserver", fork_runtime)
    conf = gated(user_conf, tmp_path)
    proc = start_gated(conf, f"sqlite:///{db}", cli_env, tmp_path)
    try:
        mlflow_run_running(db, "gate", proc)
        server = fork_server(fork_runtime)
        server.kill()
        server.wait(timeout=30)
        (tmp_path / "go").touch()
        _out, err = proc.communicate(timeout=180)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err
    assert "tracking failed" not in err and "Traceback" not in err
    assert {status for status, _e in run_statuses(db).values()} == {"FINISHED"}
    again = start_gated(conf, f"sqlite:///{db}", cli_env, tmp_path)
    _out, err = again.communicate(timeout=180)
    assert again.returncode == 0 and "tracking failed" not in err, err
    assert fork_server(fork_runtime).pid != server.pid
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
        counts = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status"))
    assert counts == {"FINISHED": 2 * 4}


def test_the_driver_of_a_tracked_cli_run_never_imports_mlflow(user_conf, tmp_path, cli_env):
    conf = user_conf(PROBE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", "-cd", str(conf), "pipeline=probe", "executor=sync", "cache=off"]
    proc = run_pipekit(*args, f"tracking.uri={uri}", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["probe: mlflow_in_driver=0"]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"pipekit: tracked in MLflow run {parent_ids(tmp_path / 'mlflow.db')[0]}"
    )
    assert {status for status, _e in run_statuses(tmp_path / "mlflow.db").values()} == {"FINISHED"}


@pytest.mark.parametrize("mode", MODES)
def test_the_writer_process_hands_back_runs_versions_and_failures(tmp_path, monkeypatch, mode):
    """The process `pipekit run` uses, driven from Python: `start_early`, then a run."""
    from mlflow import MlflowClient

    from pipekit.tracking import writer
    from pipekit.tracking.observer import MlflowObserver

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(writer.WRITER_ENV, mode)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ["executor=sync", "cache=off", "tracking=off"]
    pipeline = pk.load("cancer", overrides=overrides)
    observer = MlflowObserver(uri, experiment="cancer")
    writer.start_early()
    early = writer._early
    assert early is not None
    child = early.peer()
    result = pipeline.run(progress=False, observers=[observer])
    kind = forkserver.Session if mode == "forkserver" else subprocess.Popen
    assert isinstance(child, kind)
    # adopted, ran the calls, exited (a fork's code is known while its server lives)
    assert child.wait(timeout=30) in ((0, forkserver.UNKNOWN) if mode == "forkserver" else (0,))
    assert writer._early is None
    assert set(observer.stage_runs) == set(result.status)
    assert observer.versions == {
        "features": ("cancer.features", "1"),
        "train": ("cancer.train", "1"),
    }
    assert observer.failures == []
    client = MlflowClient(uri)
    parent = client.get_run(observer.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["pipekit.pipeline"] == "cancer"
    assert parent.data.metrics["evaluate.roc_auc"] == result["evaluate"]["roc_auc"]
    train = client.get_run(observer.stage_runs["train"])
    assert train.data.tags["pipekit.model_version"] == "cancer.train/1"
    assert train.data.tags["pipekit.upstream.features"] == "cancer.features/1"


def test_an_unpicklable_model_through_the_writer_process_fails_as_in_a_thread(tmp_path):
    from mlflow import MlflowClient

    from pipekit.tracking import writer
    from pipekit.tracking.observer import MlflowObserver

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    pipeline = pk.Pipeline.from_config(
        {
            "name": "lock",
            "stages": {"m": {"_target_": "test_tracking_faults.unpicklable", "model": True}},
        }
    )
    observer = MlflowObserver(uri, experiment="lock")
    writer.start_early()
    pipeline.run(progress=False, observers=[observer])
    run = MlflowClient(uri).get_run(observer.stage_runs["m"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipekit.model_error"].startswith(
        "TypeError: the dict output cannot be pickled (cannot pickle '_thread.lock' object)"
    )
    assert [f for f in observer.failures if "m: model not logged" in f] == observer.failures[:1]
    assert "m" not in observer.versions


@pytest.mark.parametrize(
    "overrides, primary, tracked",
    [
        ([], "defaults:\n  - tracking: local\n", True),
        (["tracking=off"], "defaults:\n  - tracking: local\n", False),
        (["tracking.enabled=false"], "", False),
        (["tracking.backend=off"], "", False),
        ([], "defaults:\n  - tracking: off   # no MLflow here\n", False),
        (["tracking=local"], "defaults:\n  - tracking: off\n", True),
        (["stages.train.params.C=0.5"], "", True),
    ],
)
def test_the_writer_process_starts_before_composing_unless_tracking_looks_off(
    overrides, primary, tracked, tmp_path
):
    from pipekit.tracking.writer import likely_tracked

    path = tmp_path / "config.yaml"
    path.write_text(primary)
    assert likely_tracked(overrides, path) is tracked

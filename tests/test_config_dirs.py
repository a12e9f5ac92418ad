"""A user's config directory, from both doors (CLI and `pk.load`): searched before pipekit's
own `conf/`, no `config.yaml` needed, documented defaults kept, the project importable,
every printed command line runnable as printed, nothing written by read-only commands."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TESTS
from conftest import run_pipekit as pipekit

import pipekit as pk
from pipekit.config import conf_dir
from pipekit.errors import OverrideError

BIN = Path(sys.executable).parent
DOCS = Path(__file__).resolve().parent.parent / "docs"

STEPS = '''"""The user's own stages (not pipekit's wine example)."""


def numbers(n: int = 4) -> list[int]:
    return list(range(n))


def fit(xs: list[int], alpha: float = 1.0) -> dict[str, float]:
    return {"score": float(sum(xs) * alpha)}
'''

#: Named like pipekit's shipped `conf/pipeline/wine.yaml`, but a different pipeline.
WINE = """# @package _global_
name: wine
stages:
  data:
    _target_: myproj.steps.numbers
    params: {n: 4}
  fit:
    _target_: myproj.steps.fit
    inputs: {xs: data}
    params: {alpha: 1.0}
"""


def write_project(root: Path, conf: dict[str, str] | None = None, name: str = "conf") -> Path:
    """`root/myproj/steps.py` and a user config dir `root/<name>` (default: only
    `pipeline/wine.yaml`); returns the config dir."""
    (root / "myproj").mkdir(parents=True, exist_ok=True)
    (root / "myproj" / "__init__.py").write_text("")
    (root / "myproj" / "steps.py").write_text(STEPS)
    where = root / name
    for rel, text in (conf if conf is not None else {"pipeline/wine.yaml": WINE}).items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_text(text)
    return where


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The project in tmp_path, importable in this process as in a notebook (cwd on
    sys.path); `myproj` is dropped from sys.modules before and after."""

    def purge() -> None:
        for name in [m for m in sys.modules if m == "myproj" or m.startswith("myproj.")]:
            del sys.modules[name]

    purge()
    monkeypatch.syspath_prepend(str(tmp_path))
    yield write_project
    purge()


def listing(root: Path) -> set[str]:
    """Every path under root (Python's own bytecode caches left out: not pipekit's)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


def written(root: Path, before: set[str]) -> set[str]:
    """What appeared under root since `before`, but for pipekit's own `.pipekit/` (the
    cache and the run locks a run takes)."""
    return {p for p in listing(root) - before if Path(p).parts[0] != ".pipekit"}


def shell_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the venv's bin first on PATH: `pipekit`, `python`, `mlflow` are the installed ones."""
    assert (BIN / "pipekit").is_file(), f"the pipekit console script is not installed in {BIN}"
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def run_printed(line: str, env: dict[str, str], cwd: Path, timeout: float = 240):
    """A command line exactly as printed, split like a shell splits it."""
    return subprocess.run(
        shlex.split(line, comments=True),
        capture_output=True,
        text=True,
        env=shell_env(env),
        cwd=cwd,
        timeout=timeout,
    )


def no_tests_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` without the tests dir on PYTHONPATH: only what a user's project has."""
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(TESTS)]
    out = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    if kept:
        out["PYTHONPATH"] = os.pathsep.join(kept)
    return out


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipekit: error: ") and "Traceback" not in proc.stderr
    return lines[0]


# --- the CLI door ------------------------------------------------------------------------


#: Tests that run pipelines tracked in MLflow several times: room on a busy machine.
SLOW = pytest.mark.timeout(900)


@SLOW
def test_cli_runs_the_users_file_with_the_documented_defaults(cli_env, tmp_path):
    conf = write_project(tmp_path)
    proc = pipekit("run", "-cd", str(conf), "stages.fit.params.alpha=2", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["fit: score=12"]  # the user's stages, alpha=2
    assert "running 2 stages of 'wine' on threads" in proc.stderr  # executor: threads
    assert (tmp_path / "mlflow.db").is_file()  # tracking: local
    assert any((tmp_path / ".pipekit" / "cache" / "entries").iterdir())  # cache: local

    # the closing hint names the store the run went to: serve it as printed (plus a free
    # port and one worker, so parallel tests do not collide) and find the run there
    [hint] = [line for line in proc.stderr.splitlines() if "browse: mlflow ui" in line]
    run_id = re.search(r"tracked in MLflow run (\w+)", hint).group(1)
    port = free_port()
    command = hint.split("browse: ", 1)[1] + f" --port {port} --workers 1"
    assert serves_run(command, run_id, port, cli_env, tmp_path) == "FINISHED"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serves_run(command: str, run_id: str, port: int, env: dict[str, str], cwd: Path) -> str:
    """Start `command` (an MLflow UI), return the status it reports for `run_id`, stop it."""
    log = cwd / "ui.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            shlex.split(command),
            env=shell_env(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, f"`{command}` exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return json.load(response)["run"]["info"]["status"]
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"`{command}` did not answer in 120 s:\n{log.read_text()}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=15)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def test_cli_validate_and_show_name_the_file(cli_env, tmp_path):
    conf = write_project(tmp_path)
    mine = conf.resolve() / "pipeline" / "wine.yaml"
    proc = pipekit("validate", "-cd", str(conf), env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pipeline 'wine': 2 stages, valid (from {mine})"
    proc = pipekit("show", "-cd", str(conf), "pipeline=wine", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"pipeline 'wine' (2 stages) (from {mine})"
    assert "xs <- data" in proc.stdout and "evaluate" not in proc.stdout
    # pipekit's own pipelines stay reachable behind the user's directory
    proc = pipekit("validate", "-cd", str(conf), "pipeline=cancer", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"(from {conf_dir() / 'pipeline' / 'cancer.yaml'})" in proc.stdout


def test_cli_group_overrides(cli_env, tmp_path):
    conf = write_project(tmp_path)
    proc = pipekit(
        "run", "-cd", str(conf), "tracking=off", "executor=sync", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "fit: score=6" in proc.stdout and "on sync" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and "MLflow" not in proc.stderr
    assert (tmp_path / ".pipekit" / "cache").is_dir()  # cache keeps its default


def test_cli_user_config_yaml_naming_only_the_pipeline(cli_env, tmp_path):
    conf = write_project(
        tmp_path,
        {
            "config.yaml": "defaults:\n  - pipeline: wine\n  - _self_\n",
            "pipeline/wine.yaml": WINE,
            "pipeline/other.yaml": WINE.replace("name: wine", "name: other"),
        },
    )
    defaults, off = tmp_path / "a", tmp_path / "b"
    for cwd in (defaults, off):
        write_project(cwd, {})
    proc = pipekit("run", "-cd", str(conf), env=cli_env, cwd=defaults)
    assert proc.returncode == 0, proc.stderr
    assert "2 stages of 'wine' on threads" in proc.stderr
    assert (defaults / "mlflow.db").is_file() and (defaults / ".pipekit" / "cache").is_dir()
    proc = pipekit("run", "-cd", str(conf), "tracking=off", env=cli_env, cwd=off)
    assert proc.returncode == 0, proc.stderr
    assert not (off / "mlflow.db").exists() and (off / ".pipekit" / "cache").is_dir()


def test_cli_imports_stage_modules_from_the_working_directory(cli_env, tmp_path):
    """The installed `pipekit` script (sys.path[0] is its bin dir, not the cwd), no
    PYTHONPATH: the project's modules import, in worker processes too."""
    conf = write_project(tmp_path)
    env = no_tests_on_path(cli_env)
    proc = run_printed(
        f"pipekit run -cd {conf} tracking=off cache=off executor=processes", env, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fit: score=6"


def test_panel_command_line_runs_as_printed(project, cli_env, tmp_path):
    from pipekit.panel import Panel

    conf = project(tmp_path, name="my conf")  # a space: the line must quote it
    p = pk.load("wine", config_dir=conf, overrides=["tracking=off"])
    pn = Panel(p)
    pn.widgets["fit.alpha"].value = 3.0
    line = pn.command_line()
    assert line.startswith(f"pipekit run -cd {shlex.quote(str(conf))} pipeline=wine")
    assert "-cn" not in line and line.endswith("tracking=off stages.fit.params.alpha=3.0")
    proc = run_printed(line, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fit: score=18"

    # a primary config of another name: -cn
    project(tmp_path, {"mine.yaml": "defaults:\n  - pipeline: wine\n  - _self_\n"}, "my conf")
    pn = Panel(pk.load(config_dir=conf, config_name="mine", overrides=["tracking=off"]))
    pn.widgets["data.n"].value = 3
    line = pn.command_line()
    assert f"-cd {shlex.quote(str(conf))} -cn mine pipeline=wine" in line
    proc = run_printed(line, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fit: score=3"


#: A `pipekit` command line inside printed text.
PRINTED = re.compile(r"(pipekit (?:run|explain|validate|show) .*)$", re.M)


def plans(text: str) -> list[str]:
    """`explain` output split per pipeline, ages ("since 3s ago") blanked."""
    text = re.sub(r"since \S+ ago", "since … ago", text)
    return ["pipeline '" + block.rstrip() for block in text.split("pipeline '")[1:]]


def test_sweeps_write_nothing_and_their_job_lines_run_as_printed(cli_env, tmp_path):
    conf = write_project(tmp_path)
    scratch = tmp_path / "tmp"  # Hydra's multirun.yaml goes to a temporary dir, removed
    scratch.mkdir()
    env = {**cli_env, "TMPDIR": str(scratch)}
    before = listing(tmp_path)
    sweep = ["-cd", str(conf), "-m", "stages.fit.params.alpha=1,3", "tracking=off"]
    proc = pipekit("run", *sweep, "--targets", "fit", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "score=6" in proc.stdout and "score=18" in proc.stdout  # both jobs ran
    assert written(tmp_path, before) == set()  # no multirun/, outputs/, multirun.yaml
    for line in PRINTED.findall(proc.stderr + proc.stdout):  # whatever command it prints
        again = run_printed(line, env, tmp_path)
        assert again.returncode == 0, f"{line}\n{again.stderr}"

    # Hydra's own multirun (here `explain -m`): each job prints the command that runs it
    # alone; alpha=1 is cached by the sweep above, alpha=5 is not
    sweep[3] = "stages.fit.params.alpha=1,5"
    proc = pipekit("explain", *sweep, "--targets", "fit", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert written(tmp_path, before) == set()
    jobs = re.findall(r"^pipekit: sweep job #\d+: (.*)$", proc.stderr, re.M)
    shown = plans(proc.stdout)
    assert len(jobs) == len(shown) == 2 and shown[0] != shown[1], proc.stdout
    for job, alpha, plan in zip(jobs, ("1", "5"), shown, strict=True):
        words = shlex.split(job)
        assert words[:4] == ["pipekit", "explain", "-cd", str(conf)] and "-m" not in words
        assert f"stages.fit.params.alpha={alpha}" in words and "--targets" in words
        again = run_printed(job, env, tmp_path)
        assert again.returncode == 0, again.stderr
        assert plans(again.stdout) == [plan]  # the same job, alone


def test_config_error_hint_runs_as_printed(project, cli_env, tmp_path):
    conf = project(tmp_path)
    bad = "stages.fit.params.alpah=3"
    line = one_error_line(pipekit("run", "-cd", str(conf), bad, env=cli_env, cwd=tmp_path))
    assert "Could not override 'stages.fit.params.alpah'" in line
    [printer] = re.findall(r"`([^`]+)` prints the config", line)
    assert printer == f"pipekit run -cd {conf} --cfg job"
    proc = run_printed(printer, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "alpha: 1.0" in proc.stdout and "_target_: myproj.steps.fit" in proc.stdout

    # the Python door gives the same hint, with the pipeline it was asked for
    with pytest.raises(OverrideError) as caught:
        pk.load("wine", config_dir=conf, overrides=[bad])
    [printer] = re.findall(r"`([^`]+)` prints the config", str(caught.value))
    assert printer == f"pipekit run -cd {conf} --cfg job pipeline=wine"
    proc = run_printed(printer, cli_env, tmp_path)
    assert proc.returncode == 0 and "alpha: 1.0" in proc.stdout, proc.stderr


@SLOW
def test_help_examples_run_as_printed(cli_env, tmp_path):
    """Every `pipekit ...` example of `pipekit --help`, and the hint of an unknown command."""
    houses = WINE.replace("name: wine", "name: houses")
    write_project(tmp_path, {"pipeline/houses.yaml": houses}, name="my_conf")
    hint = one_error_line(pipekit("rn", env=cli_env, cwd=tmp_path))
    [command] = re.findall(r"see `([^`]+)`", hint)
    overview = run_printed(command, cli_env, tmp_path)
    assert overview.returncode == 0, overview.stderr
    examples = [
        line.strip()
        for line in overview.stdout.split("examples:", 1)[1].splitlines()
        if line.strip().startswith("pipekit ")
    ]
    assert len(examples) >= 5 and any(" -cd " in e for e in examples), overview.stdout
    for example in examples:
        proc = run_printed(example, cli_env, tmp_path)
        assert proc.returncode == 0, f"{example}\n{proc.stderr}"


def test_read_only_commands_write_nothing(cli_env, tmp_path):
    conf = write_project(tmp_path)
    before = listing(tmp_path)
    for command in (
        ["validate", "-cd", str(conf)],
        ["show", "-cd", str(conf)],
        ["show", "-cd", str(conf), "--format", "dot"],
        ["explain", "-cd", str(conf)],
        ["run", "--explain", "-cd", str(conf)],
        ["run", "-cd", str(conf), "--cfg", "job"],
        ["validate"],  # pipekit's own default pipeline
        ["explain", "pipeline=wine"],
    ):
        proc = pipekit(*command, env=cli_env, cwd=tmp_path)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        assert listing(tmp_path) == before, command


def test_run_writes_hydra_output_only_where_asked(cli_env, tmp_path):
    conf = write_project(tmp_path)
    quiet = ["-cd", str(conf), "tracking=off", "cache=off"]
    before = listing(tmp_path)
    proc = pipekit("run", *quiet, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert written(tmp_path, before) == set()  # no outputs/<date>/<time>/.hydra

    proc = pipekit("run", *quiet, "hydra.run.dir=out", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert written(tmp_path, before) == {
        "out",
        "out/.hydra",
        "out/.hydra/config.yaml",
        "out/.hydra/hydra.yaml",
        "out/.hydra/overrides.yaml",
    }
    assert "alpha: 1.0" in (tmp_path / "out/.hydra/config.yaml").read_text()

    shutil.rmtree(tmp_path / "out")
    proc = pipekit(
        "run",
        *quiet,
        "-m",
        "hydra.sweep.dir=swp",
        "stages.fit.params.alpha=1,2",
        env=cli_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    swept = written(tmp_path, before)
    assert {"swp/multirun.yaml", "swp/0/.hydra/config.yaml", "swp/1/.hydra/config.yaml"} <= swept
    assert all(path.startswith("swp") for path in swept)


def test_missing_config_dir_is_one_line_exit_2(cli_env, tmp_path):
    line = one_error_line(pipekit("run", "-cd", "nope", env=cli_env, cwd=tmp_path))
    assert "config directory 'nope' does not exist" in line
    with pytest.raises(OverrideError, match="config directory 'nope' does not exist"):
        pk.load("wine", config_dir="nope")


def test_several_pipelines_without_config_yaml_ask_for_one(project, cli_env, tmp_path):
    conf = project(
        tmp_path,
        {"pipeline/wine.yaml": WINE, "pipeline/other.yaml": WINE.replace("wine", "other")},
    )
    line = one_error_line(pipekit("run", "-cd", str(conf), env=cli_env, cwd=tmp_path))
    assert "2 pipelines: choose one with pipeline=NAME (other, wine)" in line
    proc = pipekit("validate", "-cd", str(conf), "pipeline=other", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0 and "pipeline 'other'" in proc.stdout, proc.stderr
    with pytest.raises(OverrideError, match="choose one with pipeline=NAME"):
        pk.load(config_dir=conf)
    assert pk.load("other", config_dir=conf).name == "other"


def test_hydra_flag_with_its_value_after_the_overrides(cli_env, tmp_path):
    conf = write_project(
        tmp_path,
        {"config.yaml": "defaults: [{pipeline: wine}, _self_]\n", "pipeline/wine.yaml": WINE},
    )
    proc = pipekit(
        "run", "-cd", str(conf), "tracking=off", "--cfg", "job", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend: 'off'" in proc.stdout and "alpha: 1.0" in proc.stdout
    proc = pipekit("run", "-cd", str(conf), "--info", env=cli_env, cwd=tmp_path)  # value optional
    assert proc.returncode == 0 and "Defaults List" in proc.stdout, proc.stderr
    line = one_error_line(pipekit("run", "--cfg", "job", "-m", env=cli_env, cwd=tmp_path))
    assert "Only one of --run, --multirun, --cfg" in line


def test_misplaced_package_header_is_one_line_exit_2(project, cli_env, tmp_path):
    conf = project(tmp_path, {"pipeline/wine.yaml": "# my wine\n" + WINE})
    line = one_error_line(pipekit("validate", "-cd", str(conf), env=cli_env, cwd=tmp_path))
    assert f"{conf.resolve() / 'pipeline' / 'wine.yaml'}: '# @package _global_' must come" in line
    with pytest.raises(OverrideError, match="move it to the top of the file"):
        pk.load("wine", config_dir=conf)


# --- the Python door ---------------------------------------------------------------------


def test_load_runs_the_users_file_with_the_documented_defaults(project, tmp_path, monkeypatch):
    conf = project(tmp_path)
    p = pk.load("wine", config_dir=conf, overrides=["stages.fit.params.alpha=2"])
    assert p.source == conf.resolve() / "pipeline" / "wine.yaml"
    assert list(p.stages) == ["data", "fit"]
    assert p.spec.section("executor")["scheduler"] == "threads"
    assert p.spec.section("tracking")["backend"] == "local"
    assert p.spec.section("cache")["backend"] == "local"
    assert p.run(progress=False)["fit"] == {"score": 12.0}
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / ".pipekit" / "cache").is_dir()

    # without a name: the only pipeline of the user's directory, not pipekit's `cancer`
    assert pk.load(config_dir=conf).source == p.source

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    q = p.with_overrides(["tracking=off", "executor=sync"])
    assert q.spec.section("executor")["scheduler"] == "sync"
    assert q.spec.section("tracking")["backend"] == "off"
    assert q.run(progress=False)["fit"] == {"score": 12.0}
    assert not (elsewhere / "mlflow.db").exists()


def test_load_with_config_yaml_naming_only_the_pipeline(project, tmp_path):
    conf = project(
        tmp_path,
        {
            "config.yaml": "defaults:\n  - pipeline: wine\n  - _self_\n",
            "pipeline/wine.yaml": WINE,
        },
    )
    p = pk.load(config_dir=conf)
    assert p.source == conf.resolve() / "pipeline" / "wine.yaml"
    assert p.spec.section("tracking")["backend"] == "local"
    assert p.spec.section("cache")["backend"] == "local"
    assert p.spec.section("executor")["scheduler"] == "threads"
    assert pk.load(config_dir=conf, overrides=["tracking=off"]).spec.section("tracking") == {
        "backend": "off"
    }


def test_user_config_values_win_over_pipekit_group_defaults(project, tmp_path):
    """Values a user's config.yaml sets in a group it does not select are not overwritten
    by pipekit's default of that group, and `override` entries of pipekit's groups work."""
    conf = project(
        tmp_path,
        {
            "config.yaml": "defaults:\n  - pipeline: wine\n  - override executor: sync\n"
            "  - _self_\ntracking:\n  experiment: mine\ncache:\n  path: my/cache\n",
            "pipeline/wine.yaml": WINE,
        },
    )
    p = pk.load(config_dir=conf)
    assert p.spec.section("executor")["scheduler"] == "sync"
    tracking, cache = p.spec.section("tracking"), p.spec.section("cache")
    assert (tracking["backend"], tracking["experiment"]) == ("local", "mine")
    assert (cache["backend"], cache["path"]) == ("local", "my/cache")
    assert pk.load(config_dir=conf, overrides=["tracking=off"]).spec.section("tracking") == {
        "backend": "off",
        "experiment": "mine",
    }


# --- docs/getting-started.md, executed as the page shows it ----------------------------------

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_PATH = re.compile(r"# ([\w.-]+/[\w./-]+\.\w+)")


def page_steps(page: Path, heading: str) -> list[tuple[str, str, str]]:
    """The fenced blocks under `heading`, in page order: ("file", path, text) for a block
    whose leading comment lines name a file, ("console", "", line) per command, ("python",
    "", code) for a snippet."""
    text = page.read_text()
    section = text[text.index(heading) :]
    section = section[: section.find("\n## ", len(heading))]
    steps: list[tuple[str, str, str]] = []
    for lang, body in _FENCE.findall(section):
        leading = list(itertools.takewhile(lambda line: line.startswith("#"), body.splitlines()))
        named = next((m.group(1) for line in leading if (m := _PATH.match(line))), None)
        if lang == "console":
            commands = [line for line in body.splitlines() if line.strip()]
            prompted = [line[2:] for line in commands if line.startswith("$ ")]
            steps += [("console", "", line) for line in prompted or commands]
        elif named:
            steps.append(("file", named, body))
        elif lang == "python":
            steps.append(("python", "", body))
    return steps


@SLOW
def test_getting_started_example_runs_as_the_page_shows(cli_env, tmp_path):
    env = shell_env(no_tests_on_path(cli_env))
    steps = page_steps(DOCS / "getting-started.md", "## Your own pipeline")
    kinds = [kind for kind, _, _ in steps]
    assert "file" in kinds and "python" in kinds, steps
    assert any(kind == "console" and text.startswith("pipekit run") for kind, _, text in steps)
    ran_cli = False
    for kind, path, text in steps:
        if kind == "file":
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(text)
        elif kind == "console":
            argv = shlex.split(text, comments=True)
            argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
            )
            assert proc.returncode == 0, f"{text}\n{proc.stderr}"
            if argv[1:2] in (["validate"], ["show"]) and "-cd" in argv:
                where = (tmp_path / argv[argv.index("-cd") + 1]).resolve()
                assert f"(from {where}{os.sep}" in proc.stdout, proc.stdout
            ran_cli = ran_cli or argv[1:2] == ["run"]
        else:
            # the page's snippet, then what the page says of it: after the CLI run above,
            # the same directory composes the same config, so every stage is cached
            check = "\nassert result.status and set(result.status.values()) == {'cached'}, result.status\n"
            proc = subprocess.run(
                [sys.executable, "-c", text + (check if ran_cli else "")],
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=300,
            )
            assert proc.returncode == 0, f"{text}\n{proc.stderr}"

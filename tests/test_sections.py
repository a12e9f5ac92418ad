"""The whole config is validated before anything runs: the executor, cache and tracking
sections against their schema (`pipekit.core.sections`), params against their callable's
annotations, input keys against an upstream's declared return type, and stage modules that
exit or raise while importing. Each bad value fails `validate()` and `run()` from Python,
and `pipekit validate` / `pipekit run` with exit 2 and one line, leaving nothing behind."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make, run_pipekit

import pipekit as pk
from pipekit import errors
from pipekit.cache.store import open_store
from pipekit.core.sections import SECTIONS

REPO = Path(__file__).resolve().parent.parent


def _missing_fsspec_package() -> tuple[str, str]:
    """A (protocol, package) pair whose implementation package is not installed here."""
    for protocol, package in (("s3", "s3fs"), ("gcs", "gcsfs"), ("abfs", "adlfs")):
        if importlib.util.find_spec(package) is None:
            return protocol, package
    raise AssertionError("s3fs, gcsfs and adlfs are all installed: pick another protocol")


PROTOCOL, PACKAGE = _missing_fsspec_package()

# name -> (overrides, exception class, fragments of the message after "pipeline 'tiny': ")
CASES = {
    "scheduler_typo": (
        ["executor.scheduler=thread"],
        errors.ExecutorConfigError,
        [
            "executor.scheduler 'thread' is unknown (did you mean 'threads'?); "
            "use one of sync, threads, processes, distributed"
        ],
    ),
    "workers_negative": (
        ["executor.num_workers=-1"],
        errors.ExecutorConfigError,
        ["executor.num_workers must be a positive integer or null, got int -1"],
    ),
    "workers_text": (
        ["executor.num_workers=abc"],
        errors.ExecutorConfigError,
        ["executor.num_workers must be a positive integer or null, got str 'abc'"],
    ),
    "workers_zero": (
        ["executor.num_workers=0"],
        errors.ExecutorConfigError,
        ["executor.num_workers must be a positive integer or null, got int 0"],
    ),
    "workers_bool": (
        ["executor.num_workers=true"],
        errors.ExecutorConfigError,
        ["executor.num_workers must be a positive integer or null, got bool True"],
    ),
    "executor_key_typo": (
        ["+executor.num_worker=3"],
        errors.ExecutorConfigError,
        ["executor.num_worker is not an executor setting (did you mean 'num_workers'?)"],
    ),
    "cache_backend_typo": (
        ["cache.backend=locl"],
        errors.CacheConfigError,
        ["cache.backend 'locl' is unknown (did you mean 'local'?); use one of off, local, fsspec"],
    ),
    "cache_key_local": (
        ["+cache.pth=x"],
        errors.CacheConfigError,
        ["cache.pth is not a setting of the 'local' backend (did you mean 'path'?)"],
    ),
    "cache_key_of_other_backend": (
        ["+cache.url=s3://bucket/cache"],
        errors.CacheConfigError,
        ["cache.url is not a setting of the 'local' backend", "`cache=fsspec`"],
    ),
    "cache_key_fsspec": (
        ["cache=fsspec", "cache.url=memory://x", "+cache.optons={}"],
        errors.CacheConfigError,
        ["cache.optons is not a setting of the 'fsspec' backend (did you mean 'options'?)"],
    ),
    "cache_key_off": (
        ["cache=off", "+cache.path=x"],
        errors.CacheConfigError,
        ["cache.path is not a setting of the 'off' backend", "'local' backend"],
    ),
    "cache_path_type": (
        ["cache.path=[a]"],
        errors.CacheConfigError,
        ["cache.path must be a string or null, got list ['a']"],
    ),
    "cache_url_unknown_protocol": (
        ["cache=fsspec", "cache.url=nosuch://x"],
        errors.CacheConfigError,
        ["cache.url 'nosuch://x': protocol 'nosuch' is unknown to fsspec", "s3://bucket/cache"],
    ),
    "cache_url_not_a_url": (
        ["cache=fsspec", "cache.url=bucket"],
        errors.CacheConfigError,
        ["cache.url must be an fsspec URL", "got 'bucket'"],
    ),
    "cache_url_missing_package": (
        ["cache=fsspec", f"cache.url={PROTOCOL}://bucket/cache"],
        errors.CacheConfigError,
        [
            f"cache.url '{PROTOCOL}://bucket/cache' needs the '{PACKAGE}' package",
            f"pip install {PACKAGE}",
        ],
    ),
    "tracking_key_typo": (
        ["+tracking.urii=sqlite:///other.db"],
        errors.TrackingConfigError,
        ["tracking.urii is not a tracking setting (did you mean 'uri'?)"],
    ),
    "tracking_wal_not_bool": (
        ["tracking.wal=3"],
        errors.TrackingConfigError,
        ["tracking.wal must be true or false, got int 3"],
    ),
    "tracking_backend_typo": (
        ["tracking.backend=sever"],
        errors.TrackingConfigError,
        ["tracking.backend 'sever' is unknown (did you mean 'server'?)"],
    ),
    "tracking_experiment_type": (
        ["tracking.experiment=[1]"],
        errors.TrackingConfigError,
        ["tracking.experiment must be a string or null, got list [1]"],
    ),
}
#: the CLI cases (each costs two subprocesses): one per section and kind of fault
CLI_CASES = [
    "scheduler_typo",
    "workers_negative",
    "workers_text",
    "workers_zero",
    "cache_backend_typo",
    "cache_key_local",
    "cache_key_fsspec",
    "cache_url_unknown_protocol",
    "cache_url_missing_package",
    "tracking_key_typo",
    "tracking_wal_not_bool",
]


@pytest.fixture
def tiny(user_conf):
    """A user config dir holding one pipeline, `tiny`, whose stage logs that it ran."""
    return user_conf(
        {
            "pipeline/tiny.yaml": "# @package _global_\n"
            "name: tiny\n"
            "stages:\n"
            "  a:\n"
            "    _target_: core_stages.tick\n"
            "    params: {log: ran.log, name: a}\n"
        }
    )


def _nothing_ran(where: Path) -> None:
    assert not (where / "ran.log").exists(), "a stage ran"
    assert not (where / "mlflow.db").exists(), "a tracking store was created"
    assert not (where / ".pipekit").exists(), "a cache was created"


def _one_line_exit_2(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipekit: error: "), lines[0]
    return lines[0]


# --- sections from Python -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_bad_section_value_fails_validate(case, tiny):
    overrides, exc_class, fragments = CASES[case]
    pipeline = pk.load("tiny", overrides=overrides, config_dir=tiny)
    with pytest.raises(exc_class) as info:
        pipeline.validate()
    message = str(info.value)
    assert isinstance(info.value, errors.ConfigError)
    assert message.startswith(f"pipeline 'tiny': {fragments[0]}"), message
    for fragment in fragments[1:]:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("case", CASES)
def test_bad_section_value_fails_run_before_anything(case, tiny, tmp_path):
    overrides, exc_class, fragments = CASES[case]
    pipeline = pk.load("tiny", overrides=overrides, config_dir=tiny)
    with pytest.raises(exc_class, match="^" + re.escape(f"pipeline 'tiny': {fragments[0]}")):
        pipeline.run(progress=False)
    assert pipeline.last_result is None
    _nothing_ran(tmp_path)


def test_good_sections_pass_and_run(tiny, tmp_path):
    overrides = [
        "executor=threads",
        "executor.num_workers=2",
        "tracking=off",
        "cache=fsspec",
        f"cache.url=file://{tmp_path}/shared",
        "+cache.options.auto_mkdir=true",
    ]
    result = pk.load("tiny", overrides=overrides, config_dir=tiny).run(progress=False)
    assert result.status == {"a": "done"}
    assert (tmp_path / "ran.log").read_text() == "a\n"


def test_run_argument_is_checked_like_the_config(tiny, tmp_path):
    pipeline = pk.load("tiny", config_dir=tiny)
    with pytest.raises(errors.ExecutorConfigError) as info:
        pipeline.run(executor="thread", progress=False)
    assert str(info.value) == (
        "pipeline 'tiny': executor.scheduler 'thread' is unknown (did you mean 'threads'?); "
        "use one of sync, threads, processes, distributed"
    )
    assert not (tmp_path / "ran.log").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("top", "exc_class", "message"),
    [
        ({"executor": "sync"}, errors.ExecutorConfigError, "executor must be a mapping"),
        ({"executor": {"scheduler": None}}, errors.ExecutorConfigError, "got null"),
        (
            {"tracking": {"backend": "local", "enabled": "no"}},
            errors.TrackingConfigError,
            "got str",
        ),
        (
            {"cache": {"backend": "fsspec", "url": "memory://x", "options": 3}},
            errors.CacheConfigError,
            "cache.options must be a mapping",
        ),
    ],
)
def test_plain_config_sections_are_checked(top, exc_class, message):
    with pytest.raises(exc_class, match=message):
        make({"a": {"_target_": "const"}}, **top).validate()


def test_backend_off_in_any_spelling_is_valid():
    for spelling in (False, "off", "OFF", None):
        pipeline = make({"a": {"_target_": "const"}}, cache={"backend": spelling})
        assert pipeline.validate().cache_store() is None
        make({"a": {"_target_": "const"}}, tracking={"backend": spelling}).validate()


def test_open_store_uses_the_same_checks(tmp_path):
    with pytest.raises(errors.CacheConfigError, match="protocol 'nosuch' is unknown to fsspec"):
        open_store({"backend": "fsspec", "url": "nosuch://x"})
    with pytest.raises(errors.CacheConfigError, match=r"^cache.pth is not a setting"):
        open_store({"backend": "local", "pth": "x"})
    assert open_store({"backend": "local", "path": str(tmp_path)}).root == str(tmp_path)


def test_validate_checks_tracking_without_importing_mlflow_or_fsspec(tiny, cli_env, tmp_path):
    code = (
        "import sys, pipekit as pk\n"
        f"p = pk.load('tiny', overrides=['+tracking.urii=x'], config_dir={str(tiny)!r})\n"
        "try:\n"
        "    p.validate()\n"
        "except pk.ConfigError as exc:\n"
        "    print(type(exc).__name__)\n"
        "print(sorted(m for m in ('mlflow', 'fsspec') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=cli_env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.stdout.split() == ["TrackingConfigError", "[]"], proc.stderr


def test_every_section_key_is_documented():
    text = (REPO / "docs" / "config.md").read_text()
    assert "## Sections" in text
    for name, section in SECTIONS.items():
        for key in section.settings:
            assert f"`{name}.{key}`" in text, f"{name}.{key} is not in docs/config.md"


# --- sections from the command line ---------------------------------------------------------


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_validate_bad_section_is_one_line_exit_2(case, tiny, cli_env, tmp_path):
    overrides, _, fragments = CASES[case]
    proc = run_pipekit(
        "validate", "-cd", str(tiny), "pipeline=tiny", *overrides, env=cli_env, cwd=tmp_path
    )
    line = _one_line_exit_2(proc)
    assert line.startswith(f"pipekit: error: pipeline 'tiny': {fragments[0]}"), line
    for fragment in fragments[1:]:
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_run_bad_section_runs_nothing(case, tiny, cli_env, tmp_path):
    overrides, _, fragments = CASES[case]
    proc = run_pipekit(
        "run", "-cd", str(tiny), "pipeline=tiny", *overrides, env=cli_env, cwd=tmp_path
    )
    line = _one_line_exit_2(proc)
    assert line.startswith(f"pipekit: error: pipeline 'tiny': {fragments[0]}"), line
    _nothing_ran(tmp_path)


def test_cli_shipped_example_scheduler_typo(cli_env, tmp_path):
    proc = run_pipekit("validate", "executor.scheduler=thread", env=cli_env, cwd=tmp_path)
    assert _one_line_exit_2(proc) == (
        "pipekit: error: pipeline 'cancer': executor.scheduler 'thread' is unknown "
        "(did you mean 'threads'?); use one of sync, threads, processes, distributed"
    )


def test_cli_cache_command_checks_the_url(cli_env, tmp_path):
    proc = run_pipekit("cache", "ls", "--url", "nosuch://x", env=cli_env, cwd=tmp_path)
    assert "protocol 'nosuch' is unknown to fsspec" in _one_line_exit_2(proc)


# --- params against annotations ---------------------------------------------------------------

TYPED = "core_stages.typed"


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        (
            {"n": "ten"},
            "stages.a.params.n must be int (the annotation of 'n' in core_stages.typed), got str 'ten'",
        ),
        (
            {"n": True},
            "stages.a.params.n must be int (the annotation of 'n' in core_stages.typed), got bool True",
        ),
        (
            {"n": 1.5},
            "stages.a.params.n must be int (the annotation of 'n' in core_stages.typed), got float 1.5",
        ),
        ({"n": None}, "stages.a.params.n must be int"),
        ({"n": 1, "rate": "fast"}, "stages.a.params.rate must be float"),
        ({"n": 1, "rate": False}, "stages.a.params.rate must be float"),
        ({"n": 1, "name": 3}, "stages.a.params.name must be str"),
        ({"n": 1, "flag": 1}, "stages.a.params.flag must be bool"),
        ({"n": 1, "items": "a,b"}, "stages.a.params.items must be list | None"),
        ({"n": 1, "table": [1]}, "stages.a.params.table must be dict[str, int] | None"),
        ({"n": 1, "mode": "fst"}, "Literal['fast', 'slow']"),
        ({"n": 1, "mode": "fst"}, "got str 'fst' (did you mean 'fast'?)"),
        ({"n": 1, "limit": "3"}, "stages.a.params.limit must be int | None"),
        ({"n": 1, "either": 1.5}, "stages.a.params.either must be int | str"),
    ],
)
def test_param_of_the_wrong_type_is_caught_at_validation(params, fragment):
    with pytest.raises(errors.ParamTypeError) as info:
        make({"a": {"_target_": TYPED, "params": params}}).validate()
    assert isinstance(info.value, errors.SignatureError)
    assert str(info.value).startswith("pipeline 't': stages.a.params.")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "params",
    [
        {"n": 1, "rate": 2},  # an int is a fine float
        {"n": 1, "limit": None, "items": None, "table": None},  # Optional
        {"n": 1, "mode": "slow", "either": "x", "items": [1], "table": {"a": 1}},
        {"n": 1, "anything": "no annotation", "numbers": "tuple[float, ...] is not judged"},
    ],
)
def test_params_that_fit_pass(params):
    result = make({"a": {"_target_": TYPED, "params": params}}).run(executor="sync", progress=False)
    assert result["a"]["n"] == 1


def test_unresolvable_annotation_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "unresolved_stages.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from decimal import Decimal\n\n"
        "def f(amount: Decimal, note: NoSuchName = None, n: int = 0):\n"
        "    return str(amount)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = {"_target_": "unresolved_stages.f", "params": {"amount": "1.5", "note": 3}}
    assert make({"a": stage}).run(executor="sync", progress=False)["a"] == "1.5"
    with pytest.raises(errors.ParamTypeError, match=r"stages\.a\.params\.n must be int"):
        make({"a": {**stage, "params": {**stage["params"], "n": "x"}}}).validate()


def test_cli_param_type_is_one_line_exit_2(user_conf, cli_env, tmp_path):
    conf = user_conf(
        {
            "pipeline/typed.yaml": "# @package _global_\n"
            "name: typed\n"
            "stages:\n"
            "  a: {_target_: core_stages.typed, params: {n: 10}}\n"
        }
    )
    for command in ("validate", "run"):
        proc = run_pipekit(
            command,
            "-cd",
            str(conf),
            "pipeline=typed",
            "stages.a.params.n=ten",
            env=cli_env,
            cwd=tmp_path,
        )
        assert _one_line_exit_2(proc) == (
            "pipekit: error: pipeline 'typed': stages.a.params.n must be int (the annotation "
            "of 'n' in core_stages.typed), got str 'ten'; fix the value (`stages.a.params.n=...`) "
            "or the annotation"
        )
    _nothing_ran(tmp_path)


# --- input keys against an upstream's declared return type ------------------------------------


@pytest.mark.parametrize(
    ("upstream", "ref", "fragment"),
    [
        (
            "features",
            "f.Xx",
            "stage 'b' input 'x' wants 'f.Xx' but f returns FeatureSet with keys X, y "
            "(did you mean 'X'?)",
        ),
        (
            "split_data",
            "f.tran",
            "stage 'b' input 'x' wants 'f.tran' but f returns Split with keys train, test "
            "(did you mean 'train'?)",
        ),
    ],
)
def test_input_key_missing_from_declared_output_is_caught(upstream, ref, fragment, tmp_path):
    stages = {
        "f": {"_target_": upstream},
        "b": {"_target_": "tick", "inputs": {"x": ref}, "params": {"log": "ran.log", "name": "b"}},
    }
    with pytest.raises(errors.UnknownOutputKeyError) as info:
        make(stages).run(executor="sync", progress=False)
    assert str(info.value).startswith("pipeline 't': ")
    assert fragment in str(info.value)
    assert isinstance(info.value, errors.ConfigError)
    assert not (tmp_path / "ran.log").exists()


def test_declared_keys_that_exist_pass_and_undeclared_outputs_are_not_judged():
    ok = make(
        {"f": {"_target_": "features"}, "b": {"_target_": "const", "inputs": {"value": "f.y"}}}
    ).run(executor="sync", progress=False)
    assert ok["b"] == [0, 1, 0]
    # a plain `-> dict` declares no keys: the key is checked when the stage runs
    loose = make(
        {"f": {"_target_": "undeclared"}, "b": {"_target_": "add", "inputs": {"a": "f.Z"}}}
    )
    assert loose.validate() is loose


def test_cli_input_key_is_one_line_exit_2(user_conf, cli_env, tmp_path):
    conf = user_conf(
        {
            "pipeline/keys.yaml": "# @package _global_\n"
            "name: keys\n"
            "stages:\n"
            "  features: {_target_: core_stages.features}\n"
            "  train: {_target_: core_stages.add, inputs: {a: features.Xx}}\n"
        }
    )
    proc = run_pipekit("validate", "-cd", str(conf), "pipeline=keys", env=cli_env, cwd=tmp_path)
    assert _one_line_exit_2(proc) == (
        "pipekit: error: pipeline 'keys': stage 'train' input 'a' wants 'features.Xx' but "
        "features returns FeatureSet with keys X, y (did you mean 'X'?); use one of its keys "
        "or change the return annotation of core_stages.features"
    )


# --- stage modules that exit or raise while importing -----------------------------------------


def _module(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(f"{body}\n\ndef stage(x=1):\n    return x\n")
    return f"{name}.stage"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("import sys\nsys.exit(3)", "importing it called sys.exit(3)"),
        ("import sys\nsys.exit(0)", "importing it called sys.exit(0)"),
        ("raise SystemExit", "importing it called sys.exit(None)"),
        ("raise RuntimeError('no GPU')", "importing it raised RuntimeError: no GPU"),
    ],
)
def test_module_that_exits_or_raises_at_import(body, fragment, tmp_path, monkeypatch):
    name = f"import_fault_{abs(hash(body))}"
    target = _module(tmp_path, name, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(errors.TargetImportError) as info:
        make({"a": {"_target_": target}}).validate()
    assert str(info.value).startswith(f"pipeline 't': stage 'a' _target_ '{target}'")
    assert fragment in str(info.value)


def test_keyboard_interrupt_at_import_still_propagates(tmp_path, monkeypatch):
    target = _module(tmp_path, "interrupts_at_import", "raise KeyboardInterrupt")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        make({"a": {"_target_": target}}).validate()


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_module_exiting_at_import_is_one_line_exit_2(command, user_conf, cli_env, tmp_path):
    modules = tmp_path / "modules"
    modules.mkdir()
    target = _module(modules, "exits_at_import", "import sys\nprint('bye')\nsys.exit(0)")
    conf = user_conf(
        {
            "pipeline/exits.yaml": "# @package _global_\n"
            "name: exits\n"
            f"stages:\n  a: {{_target_: {target}}}\n"
        }
    )
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([str(modules), cli_env["PYTHONPATH"]])}
    proc = run_pipekit(command, "-cd", str(conf), "pipeline=exits", env=env, cwd=tmp_path)
    line = _one_line_exit_2(proc)
    assert line.startswith(
        "pipekit: error: pipeline 'exits': stage 'a' _target_ 'exits_at_import.stage': "
        "importing it called sys.exit(0)"
    ), line
    _nothing_ran(tmp_path)

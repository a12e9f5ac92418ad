"""Every config error is caught before any stage runs, with its own class and a clear message;
the CLI reports each as one line on stderr and exits 2."""

from __future__ import annotations

import itertools

import pytest
from conftest import make, run_pipekit

import pipekit as pk
from pipekit import errors

OK = {"_target_": "const"}

# name -> (stages, extra top-level keys, exception class, fragments the message must contain)
CASES = {
    "unknown_input": (
        {"features": OK, "train": {"_target_": "add", "inputs": {"a": "featurs"}}},
        {},
        errors.UnknownStageError,
        ["stage 'train'", "input 'a'", "unknown stage 'featurs'", "did you mean 'features'"],
    ),
    "unknown_after": (
        {"ingest": OK, "report": {"_target_": "const", "after": ["ingset"]}},
        {},
        errors.UnknownStageError,
        ["stage 'report'", "'after'", "unknown stage 'ingset'", "did you mean 'ingest'"],
    ),
    "cycle": (
        {
            "a": {"_target_": "add", "inputs": {"a": "c"}},
            "b": {"_target_": "add", "inputs": {"a": "a"}},
            "c": {"_target_": "add", "inputs": {"a": "b"}},
        },
        {},
        errors.CycleError,
        ["cycle", " -> "],
    ),
    "self_edge": (
        {"a": {"_target_": "add", "inputs": {"a": "a"}}},
        {},
        errors.SelfEdgeError,
        ["stage 'a'", "input 'a'", "the stage itself"],
    ),
    "target_import": (
        {"a": {"_target_": "core_stages.no_such_function"}},
        {},
        errors.TargetImportError,
        ["stage 'a'", "_target_", "core_stages.no_such_function", "cannot be imported"],
    ),
    "target_module": (
        {"a": {"_target_": "no_such_package.module.func"}},
        {},
        errors.TargetImportError,
        ["stage 'a'", "no_such_package.module.func", "installed"],
    ),
    "not_callable": (
        {"a": {"_target_": "core_stages.NOT_CALLABLE"}},
        {},
        errors.TargetNotCallableError,
        ["stage 'a'", "core_stages.NOT_CALLABLE", "not a callable"],
    ),
    "unknown_param": (
        {"a": {"_target_": "const", "params": {"valeu": 3}}},
        {},
        errors.UnknownArgumentError,
        ["stage 'a'", "param 'valeu'", "did you mean 'value'"],
    ),
    "unknown_input_arg": (
        {"a": OK, "b": {"_target_": "const", "inputs": {"x": "a"}}},
        {},
        errors.UnknownArgumentError,
        ["stage 'b'", "input 'x'", "core_stages.const"],
    ),
    "positional_only": (
        {"a": OK, "b": {"_target_": "positional_only", "inputs": {"x": "a"}}},
        {},
        errors.UnknownArgumentError,
        ["stage 'b'", "input 'x'"],
    ),
    "missing_argument": (
        {"a": OK, "b": {"_target_": "needs_two", "inputs": {"x": "a"}}},
        {},
        errors.MissingArgumentError,
        ["stage 'b'", "required argument 'y'", "not supplied"],
    ),
    "duplicate_argument": (
        {"a": OK, "b": {"_target_": "add", "inputs": {"a": "a"}, "params": {"a": 1}}},
        {},
        errors.DuplicateArgumentError,
        ["stage 'b'", "argument 'a'", "both in 'inputs' and in 'params'"],
    ),
    "inputs_list": (
        {"a": OK, "b": {"_target_": "add", "inputs": ["a"]}},
        {},
        errors.ConfigTypeError,
        ["stage 'b' inputs", "must be a mapping", "list"],
    ),
    "params_string": (
        {"a": {"_target_": "const", "params": "value=3"}},
        {},
        errors.ConfigTypeError,
        ["stage 'a' params", "must be a mapping", "str"],
    ),
    "retries_negative": (
        {"a": {"_target_": "const", "retries": -1}},
        {},
        errors.ConfigTypeError,
        ["stage 'a' retries", ">= 0"],
    ),
    "empty": ({}, {}, errors.EmptyPipelineError, ["pipeline 't'", "no stages"]),
    "bad_name": (
        {"2-train": OK},
        {},
        errors.StageNameError,
        ["stage '2-train'", "identifiers", "_train"],
    ),
    "missing_target": (
        {"a": {"params": {"value": 1}}},
        {},
        errors.ConfigTypeError,
        ["stage 'a'", "missing '_target_'"],
    ),
    "stage_key_typo": (
        {"a": {"_target_": "const", "param": {"value": 1}}},
        {},
        errors.UnknownKeyError,
        ["stage 'a'", "unknown key 'param'", "did you mean 'params'"],
    ),
    "top_level_typo": (
        {"a": OK},
        {"executer": {"scheduler": "sync"}},
        errors.UnknownKeyError,
        ["unknown top-level key 'executer'", "did you mean 'executor'"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_config_error_class_and_message(case):
    stages, top, exc_class, fragments = CASES[case]
    with pytest.raises(exc_class) as info:
        make(stages, **top).validate()
    message = str(info.value)
    assert message.startswith("pipeline 't'"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, errors.ConfigError)


def test_cycle_carries_its_path():
    stages = CASES["cycle"][0]
    with pytest.raises(errors.CycleError) as info:
        make(stages).validate()
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c"]
    # each step feeds the next: a -> b means b takes a as input
    for upstream, downstream in itertools.pairwise(cycle):
        assert stages[downstream]["inputs"]["a"] == upstream
    assert " -> ".join(cycle) in str(info.value)


def test_nothing_runs_when_invalid(tmp_path):
    marker = tmp_path / "ran"
    stages = {
        "a": {"_target_": "flaky", "params": {"counter": str(marker), "fail_times": 0}},
        "b": {"_target_": "add", "inputs": {"a": "missing"}},
    }
    with pytest.raises(errors.UnknownStageError):
        make(stages).run(executor="sync")
    assert not marker.exists()


def test_interpolated_top_level_variables_are_not_typos(user_conf):
    conf = user_conf(
        {
            "config.yaml": {
                "defaults": ["_self_"],
                "name": "v",
                "lr": 0.5,
                "stages": {"a": {"_target_": "core_stages.const", "params": {"value": "${lr}"}}},
            },
        }
    )
    p = pk.load(config_dir=conf)
    assert p.stages["a"].params["value"] == 0.5
    assert p.run(executor="sync", progress=False)["a"] == 0.5


def test_missing_interpolation_names_the_key():
    with pytest.raises(errors.ConfigError, match=r"stages\.a\.params\.value"):
        make({"a": {"_target_": "const", "params": {"value": "${nope}"}}})


def test_unknown_target_stage_in_run():
    with pytest.raises(errors.UnknownStageError, match="did you mean 'a'"):
        make({"a": OK}).run(targets=["aa"], executor="sync")


# --- the CLI: one line on stderr, exit code 2 ---------------------------------------------

CLI_CASES = [
    "unknown_input",
    "cycle",
    "target_import",
    "missing_argument",
    "inputs_list",
    "empty",
    "bad_name",
    "top_level_typo",
    "duplicate_argument",
    "not_callable",
]


def _write_case(user_conf, case):
    stages, top, _, _ = CASES[case]
    fixed = {
        name: (
            {**body, "_target_": f"core_stages.{body['_target_']}"}
            if isinstance(body.get("_target_"), str) and "." not in body["_target_"]
            else body
        )
        for name, body in stages.items()
    }
    pipeline = {"name": "t", "stages": fixed, **top}
    return user_conf({f"pipeline/{case}.yaml": "# @package _global_\n" + _yaml(pipeline)})


def _yaml(data):
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_config_error_is_one_line_exit_2(case, user_conf, cli_env, tmp_path):
    conf = _write_case(user_conf, case)
    proc = run_pipekit(
        "validate", "-cd", str(conf), f"pipeline={case}", env=cli_env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipekit: error: pipeline 't'")
    for fragment in CASES[case][3]:
        assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_verbose_shows_traceback(user_conf, cli_env, tmp_path):
    conf = _write_case(user_conf, "cycle")
    proc = run_pipekit(
        "validate", "--verbose", "-cd", str(conf), "pipeline=cycle", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CycleError" in proc.stderr


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stages.trian.params.C=1", "Could not override 'stages.trian.params.C'"),
        ("pipeline=nope", "available: book, cancer, wine"),
        ("stages.train.params.C=[", "overrides look like key=value"),
        ("executor=gpu", "available: distributed, processes, sync, threads"),
    ],
)
def test_cli_bad_override_is_one_line_exit_2(override, fragment, cli_env, tmp_path):
    proc = run_pipekit("validate", override, env=cli_env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_cli_hydra_full_error_shows_traceback(user_conf, cli_env, tmp_path):
    conf = _write_case(user_conf, "unknown_input")
    proc = run_pipekit(
        "validate",
        "-cd",
        str(conf),
        "pipeline=unknown_input",
        env={**cli_env, "HYDRA_FULL_ERROR": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UnknownStageError" in proc.stderr

"""The `pipekit` command: subcommands, Hydra flags and sweeps, exit codes, one-line errors."""

from __future__ import annotations

import pytest
from conftest import run_pipekit as pipekit

BASE = ["executor=sync", "tracking=off", "cache=off"]


def test_help_lists_subcommands(cli_env, tmp_path):
    proc = pipekit("--help", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0
    for name in ("run", "validate", "show"):
        assert f"\n  {name}" in proc.stdout


def test_unknown_subcommand_suggests(cli_env, tmp_path):
    proc = pipekit("rn", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "pipekit: error: unknown command 'rn' (did you mean 'run'?); see `pipekit --help`"
    )


def test_run_example_prints_metrics_and_progress(cli_env, tmp_path):
    proc = pipekit("run", *BASE, "stages.train.params.C=0.5", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "evaluate: accuracy=" in proc.stdout and "roc_auc=" in proc.stdout
    assert "[9/9]" in proc.stderr and "9 done" in proc.stderr


def test_stage_failure_exits_1_with_one_line(cli_env, tmp_path):
    proc = pipekit("run", *BASE, "stages.publish.params.threshold=1.5", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipekit: error:")]
    assert errors == [errors[0]] and "stage 'publish' failed: PublishRejected" in errors[0]
    assert "Traceback" not in proc.stderr


def test_stage_failure_verbose_prints_stage_traceback(cli_env, tmp_path):
    proc = pipekit(
        "run", "--verbose", *BASE, "stages.publish.params.threshold=1.5", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "raise PublishRejected" in proc.stderr


def test_targets_option_runs_a_prefix(cli_env, tmp_path):
    proc = pipekit("run", "--targets", "split", *BASE, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[5/5] split done" in proc.stderr and "train" not in proc.stderr


def test_sweep_runs_every_job(cli_env, tmp_path):
    proc = pipekit(
        "run",
        "-m",
        *BASE,
        "stages.train.params.C=0.1,10",
        "--targets",
        "evaluate",
        env=cli_env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("evaluate: accuracy=") == 2
    assert "sweep job #0: pipekit run --targets evaluate executor=sync" in proc.stderr
    assert "stages.train.params.C=0.1" in proc.stderr
    # Hydra writes its output directories only where the user asks for them
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_sweep_with_a_failing_job_exits_1_after_all_jobs(cli_env, tmp_path):
    proc = pipekit(
        "run", "-m", *BASE, "stages.publish.params.threshold=0.5,1.5", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 1
    assert proc.stdout.count("evaluate: accuracy=") == 2


def test_config_dir_and_name(cli_env, tmp_path, user_conf):
    conf = user_conf(
        {
            "mine.yaml": {
                "defaults": [{"executor": "sync"}, "_self_"],
                "name": "mine",
                "stages": {
                    "a": {"_target_": "core_stages.const", "params": {"value": 5}},
                    "b": {"_target_": "core_stages.add", "inputs": {"a": "a"}, "params": {"b": 1}},
                },
            },
        }
    )
    proc = pipekit("show", "-cd", str(conf), "-cn", "mine", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline 'mine' (2 stages)" in proc.stdout and "a <- a" in proc.stdout
    proc = pipekit("run", "-cd", str(conf), "-cn", "mine", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_hydra_cfg_flag_prints_config(cli_env, tmp_path):
    proc = pipekit(
        "run", "--cfg", "job", "pipeline=wine", "model=forest", env=cli_env, cwd=tmp_path
    )
    assert proc.returncode == 0
    assert "RandomForestClassifier" in proc.stdout


@pytest.mark.parametrize("command", ["validate", "show"])
def test_validate_and_show_exit_0(command, cli_env, tmp_path):
    proc = pipekit(command, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cancer" in proc.stdout

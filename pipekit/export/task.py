"""One stage of an exported pipeline, run inside an Airflow task.

The DAG file `pipekit export airflow` writes imports this when a task runs, never when
Airflow parses the file. The task composes the exported config in its working directory,
runs its stage (`targets=[stage]`: upstream outputs come from the cache the earlier tasks
filled) and raises the stage's error, so Airflow's retries apply.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..core.metrics import numeric_items
from ..core.result import RunResult

#: The variable that makes every task of one DAG run share one `pipekit.run_id`.
RUN_ID_VARIABLE = "PIPEKIT_RUN_ID"


def run_stage(
    stage: str,
    overrides: Sequence[str],
    *,
    config_dir: str | None = None,
    config_name: str = "config",
    workdir: str,
    run_id: str,
) -> RunResult:
    """Compose the exported config in `workdir` and run `stage` (upstream from the cache).

    Raises ConfigError (exit code 2: the DAG fails the task without retrying) or the
    stage's StageError (Airflow retries it); progress goes to stderr, the task's log.
    """
    from ..display.progress import TextProgress
    from ..pipeline import load

    with _working_directory(workdir), _variable(RUN_ID_VARIABLE, run_id):
        pipeline = load(
            None, overrides=list(overrides), config_dir=config_dir, config_name=config_name
        )
        try:
            result = pipeline.run(
                targets=[stage], observers=[TextProgress(sys.stderr, live=False)], progress=False
            )
        finally:
            _summary(pipeline.last_result, stage, pipeline.stages[stage].metrics)
    return result


def _summary(result: RunResult | None, stage: str, keys: Sequence[str]) -> None:
    if result is None:
        return
    metrics = numeric_items(result.outputs.get(stage), keys or None)
    if metrics:
        print(f"{stage}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    tracking = result.tracking
    if "mlflow_run_id" in tracking:
        print(f"pipekit: tracked in MLflow run {tracking['mlflow_run_id']}", flush=True)


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """Relative paths of the config (cache, MLflow store, data) resolve where the export
    said; the project's own stage modules there import, as from the CLI."""
    before = os.getcwd()
    os.chdir(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        yield
    finally:
        os.chdir(before)


@contextmanager
def _variable(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before

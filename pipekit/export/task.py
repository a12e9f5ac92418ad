"""One stage of an exported pipeline, run inside an Airflow task.

The DAG file `pipekit export airflow` writes imports this when a task runs, never when
Airflow parses the file (or, with `--python`, runs it as `python -m pipekit.export.task`
in pipekit's own environment). The task composes the exported config in its working
directory, runs its stage (`targets=[stage]`: upstream outputs come from the cache the
earlier tasks filled) and raises the stage's error, so Airflow's retries apply; an error
the failing stage's `retry_on` does not list becomes StageNotRetriedError (exit code 3),
which the DAG file turns into Airflow's "fail without retrying", as a local run would.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..core.metrics import numeric_items
from ..core.result import RunResult
from ..core.retry import exception_classes
from ..errors import PipekitError, StageError, StageNotRetriedError

if TYPE_CHECKING:
    from ..pipeline import Pipeline

#: The variable that makes every task of one DAG run share one `pipekit.run_id`.
RUN_ID_VARIABLE = "PIPEKIT_RUN_ID"
#: Exit codes of `python -m pipekit.export.task`: 0 ran, 1 the stage failed (Airflow may
#: retry), 2 a config error, 3 the stage failed with an error its `retry_on` does not list
#: (2 and 3: the DAG file fails the task without retrying).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_NOT_RETRIED = 0, 1, 2, 3


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

    Raises ConfigError (exit code 2: the DAG fails the task without retrying), the
    stage's StageError (Airflow retries it), or StageNotRetriedError when the failing
    stage's `retry_on` does not list the error (no retry); progress goes to stderr, the
    task's log.
    """
    from ..display.progress import TextProgress
    from ..pipeline import load
    from ..tracking.writer import ready_writer, start_if_tracked

    with _working_directory(workdir), _variable(RUN_ID_VARIABLE, run_id):
        # as `pipekit run`: MLflow's writer is a fork of the fork server, readied while
        # the config composes (each task is a new process: no MLflow import per task)
        start_if_tracked((), overrides, config_dir, config_name)
        pipeline = load(
            None, overrides=list(overrides), config_dir=config_dir, config_name=config_name
        )
        ready_writer(pipeline.spec.section("tracking"))
        try:
            result = pipeline.run(
                targets=[stage], observers=[TextProgress(sys.stderr, live=False)], progress=False
            )
        except StageError as error:
            refused = not_retried(pipeline, error)
            if refused is not None:
                raise refused from error
            raise
        finally:
            _summary(pipeline.last_result, stage, pipeline.stages[stage].metrics)
    return result


def not_retried(pipeline: Pipeline, error: StageError) -> StageNotRetriedError | None:
    """`error` as StageNotRetriedError when its stage has a `retry_on` (its own or from
    `stage_defaults`) that does not list the original exception; else None (retry)."""
    stage = error.stage
    if stage is None or stage not in pipeline.stages:
        return None
    names = pipeline.stages[stage].retry_on
    if not names or isinstance(error, StageNotRetriedError):
        return None
    cause = error.cause if error.cause is not None else error  # a timeout is its own cause
    if isinstance(cause, exception_classes(pipeline.name, stage, names)):
        return None
    return StageNotRetriedError(
        f"{error}; {type(cause).__name__} is not in its retry_on ({', '.join(names)}), "
        f"so it is not retried",
        pipeline=error.pipeline,
        stage=stage,
        cause=error.cause,
        traceback=error.traceback,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipekit.export.task [--workdir W] [-cd D] [-cn N] STAGE -- OVERRIDES`:
    one task of a DAG exported with `--python`; the exit code says whether to retry."""
    parser = argparse.ArgumentParser(
        prog="python -m pipekit.export.task",
        description="Run one stage of an exported pipeline (an Airflow task).",
    )
    parser.add_argument("--workdir", default=os.getcwd(), help="directory the task runs in")
    parser.add_argument("-cd", "--config-dir", help="the exported config directory")
    parser.add_argument("-cn", "--config-name", default="config", help="primary config name")
    parser.add_argument("stage", help="the stage to run (upstream stages come from the cache)")
    parser.add_argument("overrides", nargs="*", help="the exported Hydra overrides")
    args = parser.parse_args(argv)
    run_id = os.environ.get(RUN_ID_VARIABLE) or uuid.uuid4().hex
    try:
        run_stage(
            args.stage,
            args.overrides,
            config_dir=args.config_dir,
            config_name=args.config_name,
            workdir=args.workdir,
            run_id=run_id,
        )
    except PipekitError as error:
        if isinstance(error, StageError) and error.traceback:
            sys.stderr.write(error.traceback)
        sys.stderr.write(f"pipekit: error: {error}\n")
        if isinstance(error, StageNotRetriedError):
            return EXIT_NOT_RETRIED
        code = getattr(error, "exit_code", EXIT_CONFIG)
        return code if code in (EXIT_OK, EXIT_CONFIG) else EXIT_FAILED
    return EXIT_OK


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


if __name__ == "__main__":
    sys.exit(main())

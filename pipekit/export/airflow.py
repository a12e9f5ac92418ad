"""`pipekit export airflow`: the pipeline as an Airflow DAG file, one task per stage.

Each task runs its stage through pipekit (`export.task.run_stage`: the exported config
composed again in the directory the export ran in, `targets=[stage]`; or, with
`--python`, `python -m pipekit.export.task <stage>` in another environment), so the stage
cache hands outputs from task to task and MLflow tracking works as in a local run; the
tasks share the DAG run's `PIPEKIT_RUN_ID`, so an always-run stage (`cache: false`, a ttl)
runs once, in its own task, and later tasks take its stored output (`cache/plan.py`).
Airflow owns retries (the stage's `retries`, `retry_delay`) and the timeout; the task
switches pipekit's own retries off so attempts do not multiply, and an error the stage's
`retry_on` does not list (or a config error) fails the task with Airflow's
`AirflowFailException`, which Airflow does not retry. Parsing the generated file imports
only the standard library and Airflow: the scheduler parses DAG files often.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.spec import backend_name
from ..core.text import parse_duration
from ..errors import ConfigTypeError, ExportError, where
from .schedule import check_schedule

if TYPE_CHECKING:
    from ..pipeline import Pipeline

#: Extra seconds Airflow's `execution_timeout` allows beyond the stage's `timeout`: the
#: pipekit process starts, composes the config and loads upstream outputs first.
STARTUP_ALLOWANCE = 120
_DAG_ID = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One Airflow task: its stage, upstream stages and Airflow's task arguments."""

    stage: str
    upstream: tuple[str, ...]
    retries: int
    retry_delay: float | None  # seconds
    timeout: float | None  # seconds (the stage's own, before STARTUP_ALLOWANCE)


@dataclass(frozen=True, slots=True)
class Exported:
    """What `export_dag` wrote."""

    path: Path
    dag_id: str
    tasks: tuple[TaskSpec, ...]
    schedule: str | None


def export_dag(
    pipeline: Pipeline,
    output: str | Path,
    *,
    dag_id: str | None = None,
    python: str | None = None,
    workdir: str | Path | None = None,
) -> Exported:
    """Write the Airflow DAG file of `pipeline` to `output` (a `.py` file or a directory,
    where it is named `<dag_id>.py`) and say what was written.

    `python` is the interpreter the tasks run pipekit with (default: the Airflow worker's
    own); `workdir` the directory they run in (default: the current one), against which
    relative paths of the config resolve (`.pipekit/cache`, `mlflow.db`, data files).
    """
    pipeline.validate()
    dag_id = dag_id or _DAG_ID.sub("_", pipeline.name)
    if _DAG_ID.search(dag_id):
        raise ExportError(
            f"--dag-id '{dag_id}' may hold only letters, digits, '_', '.' and '-'; "
            f"e.g. --dag-id {_DAG_ID.sub('_', dag_id)}"
        )
    schedule = check_schedule(pipeline.spec)
    _check_cache(pipeline)
    if not pipeline.composed:
        raise ExportError(
            f"{where(pipeline.name)}: only a pipeline composed from config files can be "
            f"exported (its tasks compose it again); use `pipekit export airflow` or "
            f"pk.load(...), not Pipeline.from_config"
        )
    tasks = tuple(task_spec(pipeline, name) for name in pipeline.graph.order())
    path = _output_file(output, dag_id)
    config_dir = pipeline.config_dir
    text = render(
        pipeline,
        dag_id=dag_id,
        schedule=schedule,
        tasks=tasks,
        config_dir=str(Path(config_dir).expanduser().resolve()) if config_dir else None,
        python=python,
        workdir=str(Path(workdir or Path.cwd()).expanduser().resolve()),
    )
    compile(text, str(path), "exec")  # a generator bug fails here, not in Airflow
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)  # Airflow never parses half a file
    return Exported(path, dag_id, tasks, schedule)


def task_spec(pipeline: Pipeline, stage: str) -> TaskSpec:
    """The Airflow task of `stage`: edges as in the pipeline, retries and timeout mapped."""
    retries = _setting(pipeline, stage, "retries")
    if retries is None:
        retries = 0
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigTypeError(
            f"{where(pipeline.name, stage, 'retries')} must be a non-negative integer, "
            f"got {retries!r}"
        )
    return TaskSpec(
        stage=stage,
        upstream=pipeline.stages[stage].upstream,
        retries=retries,
        retry_delay=_seconds(pipeline, stage, "retry_delay"),
        timeout=_seconds(pipeline, stage, "timeout"),
    )


def _setting(pipeline: Pipeline, stage: str, key: str) -> Any:
    """A stage key: the stage's own, else `stage_defaults`, else the parsed Stage's field
    (keys a later pipekit adds are read the same way; a missing one is None)."""
    config = pipeline.config
    stages = config.get("stages")
    raw = stages.get(stage) if isinstance(stages, Mapping) else None
    if isinstance(raw, Mapping) and raw.get(key) is not None:
        return raw[key]
    defaults = config.get("stage_defaults")
    if isinstance(defaults, Mapping) and defaults.get(key) is not None:
        return defaults[key]
    return getattr(pipeline.stages[stage], key, None)


def _seconds(pipeline: Pipeline, stage: str, key: str) -> float | None:
    value = _setting(pipeline, stage, key)
    if value is None or value is False:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            pass
    raise ConfigTypeError(
        f"{where(pipeline.name, stage, key)} must be seconds or a duration such as 30s, 5m, "
        f"got {value!r}"
    )


def _check_cache(pipeline: Pipeline) -> None:
    """Tasks hand outputs to each other through the stage cache: it must be on."""
    section = pipeline.spec.section("cache")
    if not section or backend_name(section, "off") == "off":
        raise ExportError(
            f"{where(pipeline.name, key='cache')}: the cache is off, but each Airflow task "
            f"runs one stage and takes its inputs from the cache; use cache=local (one "
            f"machine) or cache=fsspec cache.url=s3://bucket/cache (several workers)"
        )


def _output_file(output: str | Path, dag_id: str) -> Path:
    path = Path(output).expanduser()
    if path.suffix == ".py":
        folder = path.parent
    else:
        folder, path = path, path / f"{dag_id}.py"
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"-o {output}: '{folder}' is a file, not a directory for the DAG file")
    folder.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise ExportError(f"-o {output}: '{path}' is a directory; name a .py file or its folder")
    return path


# --- the DAG file -------------------------------------------------------------------------


def render(
    pipeline: Pipeline,
    *,
    dag_id: str,
    schedule: str | None,
    tasks: tuple[TaskSpec, ...],
    config_dir: str | None,
    python: str | None,
    workdir: str,
) -> str:
    """The DAG file's source: constants first, then one generic task per stage."""
    rows = []
    for task in tasks:
        settings: dict[str, str] = {"retries": repr(task.retries)}
        if task.retries:  # pipekit retries at once unless the stage sets a delay
            settings["retry_delay"] = f"datetime.timedelta(seconds={task.retry_delay or 0.0!r})"
        if task.timeout is not None:
            limit = task.timeout + STARTUP_ALLOWANCE
            settings["execution_timeout"] = f"datetime.timedelta(seconds={limit!r})"
        shown = ", ".join(f"{k!r}: {v}" for k, v in settings.items())
        rows.append(f"    {task.stage!r}: ({list(task.upstream)!r}, {{{shown}}}),")
    command = (pipeline.command_line("export") or "").replace(
        "pipekit export", "pipekit export airflow", 1
    )
    description = pipeline.config.get("description")
    return _TEMPLATE.format(
        pipeline=pipeline.name,
        command=command.replace("\\", "\\\\").replace('"""', '\\"\\"\\"'),
        dag_id=repr(dag_id),
        schedule=repr(schedule),
        workdir=repr(workdir),
        python=repr(python),
        config_dir=repr(config_dir),
        config_name=repr(pipeline.config_name),
        overrides=_list(list(pipeline.overrides)),
        stages="\n".join(rows),
        description=repr(description if isinstance(description, str) else None),
    )


def _list(items: list[str]) -> str:
    if not items:
        return "[]"
    return "[\n" + "".join(f"    {item!r},\n" for item in items) + "]"


_TEMPLATE = '''\
"""Airflow DAG of pipekit pipeline '{pipeline}': one task per stage, written by

    {command}

Each task runs its stage through pipekit (`Pipeline.run(targets=[stage])` in WORKDIR with
the exported config; with PYTHON set, `python -m pipekit.export.task <stage>` in that
Python), so the stage cache hands outputs from task to task and MLflow tracking works as in
a local run; the tasks of one DAG run share one `pipekit.run_id`. Airflow retries a failed
task (`retries` below) unless the error is not in the stage's `retry_on`, or the config is
invalid: then the task fails at once (AirflowFailException). With workers on several machines,
use a cache all of them reach (`cache=fsspec cache.url=s3://bucket/cache`) and a tracking
server. Re-export after changing stages, edges, retries or the schedule. Parsing this file
imports only the standard library and Airflow: pipekit loads when a task runs.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import uuid

try:  # Airflow 3
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2.4+
    from airflow import DAG
    from airflow.decorators import task

DAG_ID = {dag_id}
SCHEDULE = {schedule}
#: the directory tasks run in: relative paths of the config resolve against it
WORKDIR = {workdir}
#: the config the tasks compose: pipekit's `-cd`, `-cn` and overrides
CONFIG_DIR = {config_dir}
CONFIG_NAME = {config_name}
OVERRIDES = {overrides}
#: None: run pipekit in the task's own process (pipekit installed beside Airflow);
#: a path: run `<PYTHON> -m pipekit.export.task` (pipekit in another environment)
PYTHON = {python}
#: stage -> (upstream stages, Airflow task arguments)
STAGES = {{
{stages}
}}
#: pipekit's exit code when the config is invalid: nothing ran, a retry cannot help
CONFIG_ERROR = 2
#: its exit code when the stage failed with an error its `retry_on` does not list
NOT_RETRIED = 3


def task_overrides(stage: str) -> list[str]:
    """The exported overrides, plus: Airflow retries the task (pipekit does not retry the
    stage as well) and a task never skips its stage behind the run lock."""
    return [*OVERRIDES, f"++stages.{{stage}}.retries=0", "++concurrency=wait"]


def fail_without_retry(message: str) -> None:
    try:  # Airflow 3
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # Airflow 2
        from airflow.exceptions import AirflowFailException
    raise AirflowFailException(message)


def run_in_process(stage: str, run_id: str) -> None:
    # imported when the task runs, not when Airflow parses
    from pipekit.export.task import StageNotRetriedError, run_stage

    try:
        run_stage(
            stage,
            task_overrides(stage),
            config_dir=CONFIG_DIR,
            config_name=CONFIG_NAME,
            workdir=WORKDIR,
            run_id=run_id,
        )
    except StageNotRetriedError as error:  # not in the stage's retry_on
        fail_without_retry(str(error))
    except Exception as error:
        if getattr(error, "exit_code", None) == CONFIG_ERROR:
            fail_without_retry(f"stage {{stage!r}}: invalid config: {{error}}")
        raise


def run_in_subprocess(stage: str, run_id: str) -> None:
    command = [PYTHON, "-m", "pipekit.export.task", "--workdir", WORKDIR]
    if CONFIG_DIR is not None:
        command += ["-cd", CONFIG_DIR]
    if CONFIG_NAME != "config":
        command += ["-cn", CONFIG_NAME]
    command += [stage, "--", *task_overrides(stage)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PIPEKIT_RUN_ID=run_id)
    print("pipekit task:", " ".join(command), flush=True)
    with subprocess.Popen(
        command,
        cwd=WORKDIR,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            for line in process.stdout:
                print(line, end="", flush=True)
            code = process.wait()
        except BaseException:  # a timeout or a kill of the task: stop the stage too
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if code == CONFIG_ERROR:
        fail_without_retry(f"stage {{stage!r}}: invalid config (pipekit exit 2), see above")
    if code == NOT_RETRIED:
        fail_without_retry(
            f"stage {{stage!r}} failed with an error its retry_on does not list "
            f"(pipekit exit 3), see above"
        )
    if code != 0:
        raise RuntimeError(f"stage {{stage!r}} failed (pipekit exit {{code}}), see above")


@task
def pipekit_stage(stage: str, **context) -> None:
    """Run one stage of the pipeline (its upstream comes from the stage cache)."""
    run_id = uuid.uuid5(uuid.NAMESPACE_URL, f"airflow:{{DAG_ID}}/{{context['run_id']}}").hex
    if PYTHON is None:
        run_in_process(stage, run_id)
    else:
        run_in_subprocess(stage, run_id)


with DAG(
    dag_id=DAG_ID,
    schedule=SCHEDULE,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,  # a DAG run waits for the previous one, like `concurrency: wait`
    description={description},
    tags=["pipekit"],
    doc_md=__doc__,
):
    tasks = {{
        name: pipekit_stage.override(task_id=name, **settings)(name)
        for name, (_, settings) in STAGES.items()
    }}
    for name, (upstream, _) in STAGES.items():
        for before in upstream:
            tasks[before] >> tasks[name]
'''

"""The exception hierarchy: every message names the pipeline, stage and key at fault.

All messages go through `where()` so they share one shape, e.g.
``pipeline 'cancer': stage 'train' input 'X' refers to unknown stage 'featurs' (did you mean 'features'?)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Sequence


def where(pipeline: str | None, stage: str | None = None, key: str | None = None) -> str:
    """Format the location prefix of an error message."""
    parts = []
    if pipeline is not None:
        parts.append(f"pipeline '{pipeline}'")
    if stage is not None:
        parts.append(f"stage '{stage}'" + (f" {key}" if key else ""))
    elif key:
        parts.append(key)
    return ": ".join(parts)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(
    given: Iterable[object],
    allowed: Collection[str],
    error_class: Callable[[str], Exception],
    at: str,
    hint: str | Callable[[str], str] = "",
    *,
    noun: str | None = None,
) -> None:
    """Raise `error_class` for the first key of `given` not in `allowed`: the one shape of
    a config's key checks, `<at>: unknown key 'k' (did you mean 'x'?); known: a, b`, or
    with `noun` (`at` then being the section's override path, e.g. `tracking`)
    `<at>.k is not <noun> (did you mean 'x'?); known: a, b`. `hint` (or `hint(key)`)
    follows after '; ' when not empty."""
    for key in given:
        if key in allowed:
            continue
        name = str(key)
        head = f"{at}.{name} is not {noun}" if noun else f"{at}: unknown key '{name}'"
        more = hint(name) if callable(hint) else hint
        raise error_class(
            f"{head}{did_you_mean(name, allowed)}; known: {', '.join(allowed)}"
            + (f"; {more}" if more else "")
        )


class PipekitError(Exception):
    """Base of every error pipekit raises on purpose."""


# --- configuration errors: caught before anything runs (CLI exit code 2) ---------------


class ConfigError(PipekitError):
    """The pipeline config is invalid; nothing has run."""

    exit_code = 2


class ConfigTypeError(ConfigError):
    """A config value has the wrong type or shape (e.g. `inputs` given as a list)."""


class UnknownKeyError(ConfigError):
    """A key that pipekit does not know (usually a typo)."""


class EmptyPipelineError(ConfigError):
    """The pipeline declares no stages."""


class StageNameError(ConfigError):
    """A stage name is not a Python identifier."""


class UnknownStageError(ConfigError):
    """An edge (`inputs`, `after`, `targets`) names a stage that does not exist."""


class CycleError(ConfigError):
    """The stages' edges form a cycle; `cycle` holds its path, first stage repeated last."""

    def __init__(self, message: str, cycle: Sequence[str]):
        super().__init__(message)
        self.cycle = list(cycle)


class SelfEdgeError(CycleError):
    """A stage lists itself as an input or in `after`."""


class TargetImportError(ConfigError):
    """A stage's `_target_` cannot be imported."""


class TargetNotCallableError(ConfigError):
    """A stage's `_target_` imports but is not callable."""


class SignatureError(ConfigError):
    """The stage's inputs/params do not fit its callable's signature."""


class UnknownArgumentError(SignatureError):
    """An input or param the callable does not accept."""


class MissingArgumentError(SignatureError):
    """A required argument of the callable that no input or param supplies."""


class ParamTypeError(SignatureError):
    """A param's value does not fit the callable's (simple) annotation, e.g. 'ten' for int."""


class UnknownOutputKeyError(SignatureError):
    """An input `stage.key` names a key the upstream's declared return type (TypedDict or
    dataclass) does not have."""


class DuplicateArgumentError(ConfigError):
    """The same argument is given both as an input and as a param."""


class OverrideError(ConfigError):
    """A Hydra override or config composition failed."""


class TrackingConfigError(ConfigError):
    """The `tracking` section is invalid (unknown backend or key, a URI that cannot work)."""


class CacheConfigError(ConfigError):
    """The `cache` section is invalid (unknown backend or key), or a `--force` names no stage."""


class CacheNotOursError(ConfigError):
    """`cache clear|prune` refused a directory: `/`, the home directory, one without pipekit's
    marker file, or one holding files pipekit did not write. Nothing was removed."""


class ExecutorConfigError(ConfigError):
    """The `executor` section is invalid (unknown scheduler or key, a bad worker count)."""


class ClusterError(ExecutorConfigError):
    """`executor=distributed` cannot be used: no Dask scheduler answers at `executor.address`,
    the `distributed` package is missing, or no worker offers a resource a stage needs."""


class MatrixError(ConfigError):
    """A stage's `matrix`/`foreach`/`members` is invalid, or an input refers to a matrix
    stage without saying which members it wants (`train[*]`, `train[:]`, one member)."""


class SweepError(ConfigError):
    """A sweep cannot run as asked: no swept values, or a `--best`/`sweep.metric` that names
    no metric of the jobs' results."""


class ServeConfigError(ConfigError):
    """The `serve` section (the inference DAG) is invalid: an unknown key, a bad type, a
    `model` that names no model stage, an unknown `method`."""


class ScheduleError(ConfigError):
    """`schedule` is not a 5-field cron expression (or a preset such as `@hourly`)."""


class ConcurrencyConfigError(ConfigError):
    """`concurrency` is not `wait` or `skip`."""


class RetryOnError(ConfigError):
    """A `retry_on` entry (stage or `stage_defaults`) is not an importable exception class."""


class PromotionConfigError(ConfigError):
    """A stage's `promote` can never act: no model stage at or upstream of it, a `metric`
    naming no stage upstream of it (or no metric that stage logs), a bad `mode`."""


class ExportError(ConfigError):
    """A pipeline cannot be exported as asked (`pipekit export airflow`): no cache to hand
    outputs from task to task, a pipeline not composed from config files, a bad `-o`."""


# --- run-time errors (CLI exit code 1) --------------------------------------------------


class StageError(PipekitError):
    """A stage failed while running. `stage` names it, `cause` is the original exception."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        pipeline: str | None = None,
        stage: str | None = None,
        cause: BaseException | None = None,
        traceback: str = "",
    ):
        super().__init__(message)
        self.pipeline = pipeline
        self.stage = stage
        self.cause = cause
        self.traceback = traceback
        self.result = None  # the partial RunResult, set by Pipeline.run


class OutputKeyError(StageError):
    """`inputs: {arg: upstream.key}` where upstream's output is not a mapping or lacks key."""


class UnpicklableOutputError(StageError):
    """Under `executor=processes`, a stage returned a value that cannot be pickled, so it
    cannot travel from its worker process to the driver."""


class StageTimeoutError(StageError, TimeoutError):
    """A stage attempt ran longer than its `timeout`: abandoned (threads, sync) or its
    worker process retired (processes). A TimeoutError, so `retry_on: [TimeoutError]`
    retries it."""


class WorkerDiedError(StageError):
    """A worker process died while running a stage (`os._exit`, a crash, the OOM killer)."""


class StageNotRetriedError(StageError):
    """A stage failed with an error its `retry_on` does not list, in a task whose scheduler
    owns the retries (`pipekit export airflow`): the task must fail without a retry."""


class CacheEntryError(PipekitError):
    """A stored stage output cannot be read (truncated, corrupt, unpicklable here)."""

    exit_code = 1


class CacheWarning(UserWarning):
    """Something in the stage cache went wrong but the run goes on (e.g. a corrupt entry)."""


class TrackingError(PipekitError):
    """An MLflow lookup failed: unknown registered model, version or alias (exit code 1)."""

    exit_code = 1


class PromotionError(TrackingError):
    """A metric-based promotion cannot decide: the run logged no value for its `metric`;
    the alias stays where it was (tag `pipekit.promote_error` on the promoting stage)."""


class TrackingUnavailableError(TrackingError):
    """The tracking store cannot be used in time: a server that does not answer, or a local
    store whose creation lock another process holds too long. The message names the URI."""


class TrackingWriterError(TrackingError):
    """The tracking writer process of `pipekit run` ended (killed, crashed) before the run's
    MLflow calls were done; the driver ended the runs it had reported creating FAILED."""


class TrackingFailedError(TrackingError):
    """Tracking of a run failed and `tracking.on_error` is `fail` (raised after the run;
    `.result` holds its RunResult, whose stages ran)."""

    def __init__(self, message: str, *, result: object = None):
        super().__init__(message)
        self.result = result


class ServingError(PipekitError):
    """Exporting, serving or batch-scoring the inference DAG failed: no model version to
    use, versions pinned together that were not trained together, a model lacking the
    called method, an unreadable input file (exit code 1)."""

    exit_code = 1


class RunSkipped(PipekitError):
    """`concurrency: skip` and another run of the pipeline holds its run lock: this run
    did nothing, on purpose (CLI exit code 0)."""

    exit_code = 0


class GraphvizNotFoundError(PipekitError):
    """Drawing needs Graphviz's `dot` binary (or the `graphviz` Python package) and it is missing."""

    exit_code = 1


# --- interruptions: not errors of the pipeline, so not PipekitErrors -------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run. A KeyboardInterrupt, so code that handles Ctrl-C
    handles both; the CLI exits with `exit_code` (128 + the signal number: 130, 143).

    `stopped` names the stages that were running; `tracking` where the run was tracked.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        self.signame = signal.Signals(self.signum).name
        self.stopped: tuple[str, ...] = ()
        self.tracking: dict[str, str] = {}
        super().__init__(self.signame)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):
        return (Interrupted, (self.signum,))

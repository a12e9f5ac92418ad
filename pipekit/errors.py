"""The exception hierarchy: every message names the pipeline, stage and key at fault.

All messages go through `where()` so they share one shape, e.g.
``pipeline 'cancer': stage 'train' input 'X' refers to unknown stage 'featurs' (did you mean 'features'?)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


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


class DuplicateArgumentError(ConfigError):
    """The same argument is given both as an input and as a param."""


class OverrideError(ConfigError):
    """A Hydra override or config composition failed."""


class TrackingConfigError(ConfigError):
    """The `tracking` section is invalid (unknown backend or key, a URI that cannot work)."""


class CacheConfigError(ConfigError):
    """The `cache` section is invalid (unknown backend or key), or a `--force` names no stage."""


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


class CacheEntryError(PipekitError):
    """A stored stage output cannot be read (truncated, corrupt, unpicklable here)."""

    exit_code = 1


class CacheWarning(UserWarning):
    """Something in the stage cache went wrong but the run goes on (e.g. a corrupt entry)."""


class TrackingError(PipekitError):
    """An MLflow lookup failed: unknown registered model, version or alias (exit code 1)."""

    exit_code = 1


class GraphvizNotFoundError(PipekitError):
    """Drawing needs Graphviz's `dot` binary (or the `graphviz` Python package) and it is missing."""

    exit_code = 1

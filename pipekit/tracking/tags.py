"""The MLflow tag schema: every tag pipekit writes on runs and model versions, and reads
back (lineage, cache hits, `pipekit cache ls`), named once."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

PREFIX = "pipekit."

# runs (parent and stage)
PIPELINE = "pipekit.pipeline"
STAGE = "pipekit.stage"
RUN_ID = "pipekit.run_id"  # pipekit's id of the pipeline run, shared by its MLflow runs
CONFIG_HASH = "pipekit.config_hash"
OVERRIDES = "pipekit.overrides"
EXECUTOR = "pipekit.executor"
STAGES = "pipekit.stages"
GIT_COMMIT = "pipekit.git_commit"
TARGET = "pipekit.target"
STATUS = "pipekit.status"
ERROR = "pipekit.error"
FAILED_STAGES = "pipekit.failed_stages"
SKIPPED_STAGES = "pipekit.skipped_stages"
CACHE_HIT = "pipekit.cache_hit"
CACHE_SOURCE_RUN = "pipekit.cache_source_run"  # the stage run that computed a cached output
CACHE_KEY = "pipekit.cache_key"  # the cache entry a stage run or model version belongs to
MODEL_VERSION = "pipekit.model_version"
MODEL_ERROR = "pipekit.model_error"
PROMOTED = "pipekit.promoted"
PROMOTE_ERROR = "pipekit.promote_error"
PROMOTION = "pipekit.promotion"  # why an alias moved or stayed (metric of new vs holder)
ATTEMPTS = "pipekit.attempts"  # a stage with retries: attempts made, e.g. "2/3"
FIRST_ERROR = "pipekit.first_error"  # ... and its first failed attempt's error

# model versions
PARENT_RUN_ID = "pipekit.parent_run_id"
FLAVOR = "pipekit.flavor"
MODEL_ID = "pipekit.model_id"  # the MLflow 3 logged model a version registers (`m-...`)
MATRIX = "pipekit.matrix"  # a matrix member's stage run: the matrix's name
MEMBER = "pipekit.member"  # ... and its values, as JSON ({"region": "eu"})
SWEEP_ID = "pipekit.sweep_id"  # every parent run of one `pipekit run -m` / `pk.sweep`
SWEEP_JOB = "pipekit.sweep_job"  # the job's number and overrides in that sweep
SHARED = "pipekit.shared."  # + stage: the stage run (of an earlier job) this job reused
UPSTREAM = "pipekit.upstream."  # + stage name: "<model>/<version>" it consumed
METRIC = "pipekit.metric."  # + stage.key: the promotion metric of the run that made it
CANDIDATE = "pipekit.candidate."  # + alias: "true" once the version competed for it

# MLflow's own tags pipekit writes
RUN_NAME = "mlflow.runName"
#: on an experiment: which view MLflow's UI opens it in ("Model training", not GenAI)
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING = "custom_model_development"
#: on a logged model: the registered versions made from it, JSON [{"name", "version"}]
MODEL_VERSIONS = "mlflow.modelVersions"


def metric(stage: str, name: str) -> str:
    """The tag holding a version's promotion metric `stage.name` (`pipekit.metric.evaluate.acc`)."""
    return f"{METRIC}{key_text(stage)}.{name}"


def upstream(stage: str) -> str:
    """The tag naming the version of upstream model stage `stage` a version consumed."""
    return f"{UPSTREAM}{key_text(stage)}"


_MEMBER = re.compile(r"\[([^\]]*)\]")


def key_text(name: str) -> str:
    """A stage name as MLflow keys allow it (letters, digits, `_ - . / :`): matrix members
    `train[region=eu,model=logreg]` become `train/region:eu/model:logreg`."""
    if "[" not in name:
        return name
    return _MEMBER.sub(lambda m: "/" + m.group(1).replace("=", ":").replace(",", "/"), name)


def upstream_versions(tags: Mapping[str, str]) -> list[tuple[str, str]]:
    """(model, version) pairs a model version's tags say it consumed, sorted."""
    found = []
    for key, value in sorted(tags.items()):
        if key.startswith(UPSTREAM) and "/" in value:
            name, _, number = value.rpartition("/")
            found.append((name, number))
    return found


#: Override roots that say where or how a run ran, not what it computed: not in run names.
PLUMBING = frozenset({"executor", "tracking", "cache", "hydra", "pipeline", "serve"})
#: Path segments that name no particular thing (`stages.train.params.C` reads `C`).
_FILLER = frozenset({"stages", "params"})
#: A parent run's name stays this short; each override value at most VALUE_CHARS.
NAME_CHARS = 80
VALUE_CHARS = 24


def run_name(
    pipeline: str, overrides: Sequence[str], run_id: str, config: Mapping | None = None
) -> str:
    """A parent run's name a person can read in MLflow's runs table: the pipeline and the
    overrides that change what it computes, each by the last segment of its key
    (`cancer C=0.5 model=forest`); secrets and plumbing (executor, tracking, cache, hydra)
    left out; at most NAME_CHARS, the rest counted (`+2 more`). Without such overrides:
    `<pipeline>-<first 8 of the run id>`. Runs with the same name differ by start time."""
    from ..core.redact import MASK, redact_overrides

    shown: list[tuple[list[str], str, str]] = []  # (key segments, prefix, value)
    for override in redact_overrides(overrides, config):
        key, sep, value = override.partition("=")
        prefix = "~" if key.startswith("~") else ""
        path = key.lstrip("+~").split("@", 1)[0].split(".")
        if not path[0] or path[0].split("/", 1)[0] in PLUMBING or value == MASK:
            continue
        segments = [part for part in path if part not in _FILLER] or path[-1:]
        value = " ".join(value.split())
        if len(value) > VALUE_CHARS:
            value = value[: VALUE_CHARS - 3] + "..."
        shown.append((segments, prefix, f"={value}" if sep else ""))
    if not shown:
        return f"{pipeline}-{run_id[:8]}"
    names = _short_keys([segments for segments, _, _ in shown])
    parts = [
        f"{prefix}{name}{value}" for name, (_, prefix, value) in zip(names, shown, strict=True)
    ]
    name = " ".join([pipeline, *parts])
    left = len(parts)
    while len(name) > NAME_CHARS and left > 1:
        left -= 1
        name = " ".join([pipeline, *parts[:left], f"+{len(parts) - left} more"])
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def _short_keys(paths: list[list[str]]) -> list[str]:
    """Each key path by its last segment, or as many last segments as set it apart from
    the others (`train.C` and `svm.C`)."""
    depth = [1] * len(paths)
    for _ in range(max(map(len, paths))):
        names = [".".join(path[-n:]) for path, n in zip(paths, depth, strict=True)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        depth = [d + 1 if n in clashes else d for n, d in zip(names, depth, strict=True)]
    return [".".join(path[-n:]) for path, n in zip(paths, depth, strict=True)]

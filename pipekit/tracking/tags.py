"""The MLflow tag schema: every tag pipekit writes on runs and model versions, and reads
back (lineage, cache hits, `pipekit cache ls`), named once."""

from __future__ import annotations

import re
from collections.abc import Mapping

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
MATRIX = "pipekit.matrix"  # a matrix member's stage run: the matrix's name
MEMBER = "pipekit.member"  # ... and its values, as JSON ({"region": "eu"})
SWEEP_ID = "pipekit.sweep_id"  # every parent run of one `pipekit run -m` / `pk.sweep`
SWEEP_JOB = "pipekit.sweep_job"  # the job's number and overrides in that sweep
SHARED = "pipekit.shared."  # + stage: the stage run (of an earlier job) this job reused
UPSTREAM = "pipekit.upstream."  # + stage name: "<model>/<version>" it consumed
METRIC = "pipekit.metric."  # + stage.key: the promotion metric of the run that made it
CANDIDATE = "pipekit.candidate."  # + alias: "true" once the version competed for it


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

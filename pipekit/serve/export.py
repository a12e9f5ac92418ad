"""`pipekit export mlflow`: the inference DAG logged as one MLflow pyfunc, an MLflow 3
logged model named `serving` (in the experiment's Models tab, made by the export's run),
registered as `<pipeline>.serving` (the version points at the logged model, as a model
stage's does: `tracking.client.log_saved_model`, `register`), its alias moved to it.

The export pins one registered version per model stage (`registry.resolve_pins`), copies
those models into the new model's `artifacts/`, runs the DAG on `serve.example` to infer
the signature (so MLflow's schema enforcement rejects requests with missing columns or
wrong types), and records the pins three ways: the version's `pipekit.upstream.<stage>`
tags (so `pipekit lineage` walks through it), `serving.json` on the export's run, and the
MLmodel's metadata (so a server can say which stage versions answer).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import types
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.serving import ServeSpec, example_function
from ..core.spec import PipelineSpec
from ..errors import ServeConfigError, ServingError, where
from ..tracking import tags as tag
from .registry import Pin, aliased_version, download, open_client, resolve_pins, tracking_uri

log = logging.getLogger(__name__)

#: The serving model's MLmodel `metadata` key holding the pins.
METADATA_KEY = "pipekit"


@dataclass(frozen=True)
class Exported:
    """What an export registered: `name` v`version`, the alias moved (or None), the pins."""

    name: str
    version: str
    alias: str | None
    run_id: str
    uri: str
    pins: Mapping[str, Pin] = field(default_factory=dict)
    #: False when the alias already served these stage versions (`skip_unchanged`)
    new: bool = True

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        pins = ", ".join(f"{p} ({p.chosen})" for p in self.pins.values())
        if not self.new:
            return f"{self.name} v{self.version} (@{self.alias}) already applies {pins}"
        moved = f", alias @{self.alias} moved to it" if self.alias else ", no alias moved"
        return f"exported {self.name} v{self.version}{moved}; applies {pins}"


def export(
    spec: PipelineSpec,
    serve: ServeSpec | None,
    training_order: Iterable[str],
    *,
    alias: bool | str = True,
    skip_unchanged: bool = False,
    prefer: str | None = None,
) -> Exported:
    """Log and register the inference DAG of a validated pipeline; see the module doc.

    `alias=True` moves `serve.alias` to the new version, a string moves that alias,
    False moves none. `skip_unchanged` registers nothing when the alias already points
    at a version applying the same stage versions; `prefer` names the alias stage
    versions are taken from when their `version` is unset (both: export on promote).
    """
    if serve is None:
        raise ServeConfigError(
            f"{where(spec.name)}: has no 'serve' section to export; declare the inference "
            f"DAG under serve.stages (see docs/serving.md)"
        )
    if serve.example is None:
        raise ServeConfigError(
            f"{where(spec.name, key='serve.example')} is not set; export infers the model's "
            f"signature from example request rows: set serve.example._target_ to a callable "
            f"returning a few rows"
        )
    moved = serve.alias if alias is True else (alias or None)
    uri = tracking_uri(spec)
    from ..tracking.client import http_limits

    with http_limits():
        client = open_client(uri)
        pins = resolve_pins(client, serve, training_order, prefer)
        if skip_unchanged and moved:
            current = aliased_version(client, serve.model_name, moved)
            if current is not None and all(
                (current.tags or {}).get(tag.upstream(p.stage)) == f"{p.name}/{p.version}"
                for p in pins.values()
            ):
                return Exported(
                    serve.model_name,
                    str(current.version),
                    moved,
                    current.run_id or "",
                    uri,
                    dict(pins),
                    new=False,
                )
        return _log(client, spec, serve, pins, uri, moved)


def _log(
    client: Any,
    spec: PipelineSpec,
    serve: ServeSpec,
    pins: Mapping[str, Pin],
    uri: str,
    alias: str | None,
) -> Exported:
    from ..tracking.client import experiment_id, log_saved_model, log_text, register
    from ..tracking.observer import config_hash
    from ..tracking.settings import settings_from_config
    from .model import ServingModel, load_stage_model

    settings = settings_from_config(spec.name, spec.section("tracking"))
    experiment = experiment_id(client, settings.experiment, settings.artifacts)
    chosen = ", ".join(f"{p.stage}={p.name}/{p.version}" for p in pins.values())
    tags = {
        "mlflow.runName": f"{serve.model_name} export",
        "mlflow.source.name": f"pipekit:export:{spec.name}",
        "mlflow.source.type": "LOCAL",
        "mlflow.note.content": f"The inference DAG of pipeline '{spec.name}': {chosen}",
        tag.PIPELINE: spec.name,
        tag.STAGE: "serving",
        tag.CONFIG_HASH: config_hash(spec.config),
        **{tag.upstream(p.stage): f"{p.name}/{p.version}" for p in pins.values()},
    }
    run = client.create_run(experiment, tags=tags)
    run_id, artifact_uri = run.info.run_id, run.info.artifact_uri
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory(prefix="pipekit-export-") as tmp:
            stage_dirs = {}
            for pin in pins.values():
                stage_dirs[pin.stage] = download(
                    client, uri, pin.name, pin.version, os.path.join(tmp, "stages", pin.stage)
                )
            python_model = ServingModel(
                spec.name,
                spec.config["serve"],
                {p.stage: f"{p.name}/{p.version}" for p in pins.values()},
            )
            models = {stage: load_stage_model(path) for stage, path in stage_dirs.items()}
            inference = python_model.bind(serve, models)
            example = _example(serve)
            try:
                output = inference(example)
            except Exception as exc:
                raise ServingError(
                    f"{where(spec.name, key='serve.example')}: the inference DAG failed on the "
                    f"example rows with {', '.join(map(str, pins.values()))}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            record = {
                "pipeline": spec.name,
                "model": serve.model_name,
                "stages": {p.stage: f"{p.name}/{p.version}" for p in pins.values()},
                "chosen": {p.stage: p.chosen for p in pins.values()},
                "serve": spec.config["serve"],
                "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }

            def save(path: str, meta: Any) -> str:
                _save(path, python_model, stage_dirs, example, output, record, meta)
                return "pyfunc"

            version_tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
            _, model = log_saved_model(
                client, run_id, experiment, "serving", save, tags=version_tags
            )
        log_text(client, run_id, artifact_uri, json.dumps(record, indent=2), "serving.json")
        description = types.SimpleNamespace(
            description=f"The inference DAG of pipeline '{spec.name}' (pipekit export mlflow)"
        )
        version_tags.update({tag.FLAVOR: "pyfunc", tag.MODEL_ID: model.model_id})
        created = register(
            client,
            serve.model_name,
            model.artifact_location,
            run_id,
            version_tags,
            description,
            model,
        )
        version = str(created.version)
        if alias:
            client.set_registered_model_alias(serve.model_name, alias, version)
        client.set_tag(run_id, tag.MODEL_VERSION, f"{serve.model_name}/{version}")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return Exported(serve.model_name, version, alias, run_id, uri, dict(pins))


def _example(serve: ServeSpec) -> Any:
    assert serve.example is not None
    try:
        rows = example_function(serve)(**serve.example.params)
    except (ServeConfigError, ServingError):
        raise
    except Exception as exc:
        raise ServingError(
            f"{where(serve.pipeline, key='serve.example')} {serve.example.target} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    import pandas as pd

    if not isinstance(rows, pd.DataFrame) or rows.empty:
        raise ServingError(
            f"{where(serve.pipeline, key='serve.example')} {serve.example.target} must return "
            f"a non-empty pandas DataFrame of request rows, got {type(rows).__name__}"
        )
    return rows


def _save(
    path: str,
    python_model: Any,
    stage_dirs: Mapping[str, str],
    example: Any,
    output: Any,
    record: Mapping[str, Any],
    mlflow_model: Any = None,
) -> None:
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from ..tracking.flavors import quiet, requirements

    with warnings.catch_warnings(), quiet("mlflow.models.model"), quiet("mlflow.pyfunc"):
        warnings.simplefilter("ignore", UserWarning)  # hints about integer columns
        signature = infer_signature(example, output)
        mlflow.pyfunc.save_model(
            path,
            python_model=python_model,
            artifacts=dict(stage_dirs),
            signature=signature,
            input_example=example,
            pip_requirements=requirements(["mlflow", "pandas", "scikit-learn", "cloudpickle"]),
            metadata={METADATA_KEY: dict(record)},
            mlflow_model=mlflow_model,
        )

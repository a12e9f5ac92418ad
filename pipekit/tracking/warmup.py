"""The MLflow calls of a tracked run, made once against a scratch store by the fork server.

A fresh process pays for more than MLflow's import on its first calls: SQLAlchemy
configures MLflow's ORM mappers and compiles its queries, MLflow imports modules inside
functions, the model flavour builds its requirements. A fork of the server inherits all
of that when the server has done it once (`forkserver.py`): on this machine the MLflow
work of a cached `cancer` run in a fork went from ~0.9 s to ~0.5 s. The scratch store is
in a temporary directory, deleted afterwards; nothing else is touched.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

log = logging.getLogger(__name__)


def workout() -> None:
    """Each kind of call `MlflowObserver` makes: experiment, parent and stage runs, a
    batch, an artifact, a logged model with its signature, a version, the searches of a
    cached stage. A failure is only logged: a cold fork is slower, never wrong."""
    from .client import client_for, close_engines

    with tempfile.TemporaryDirectory(prefix="pipekit-warmup-") as tmp:
        client = None
        try:
            client = client_for(f"sqlite:///{tmp}/mlflow.db")
            _calls(client, tmp)
        except Exception as exc:
            log.warning("pipekit tracking: warm-up stopped: %s", exc)  # the server's log
        finally:
            if client is not None:
                close_engines(client)  # no connection to a deleted file is kept


def _calls(client: Any, tmp: str) -> None:
    from . import tags as tag
    from .client import (
        experiment_id,
        log_batch,
        log_model,
        log_text,
        register,
        run_for_cache_key,
        version_for_cache_key,
    )

    experiment = experiment_id(client, "pipekit-warmup", f"{tmp}/artifacts")
    parent = client.create_run(experiment, tags={tag.PIPELINE: "warmup"})
    parent_id = parent.info.run_id
    log_batch(client, parent_id, params={"stage.a": "1"}, metrics={"stage.score": 1.0})
    log_text(client, parent_id, parent.info.artifact_uri, "a: 1\n", "config.yaml")
    stage = client.create_run(experiment, tags={"mlflow.parentRunId": parent_id})
    stage_id = stage.info.run_id
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:  # no scikit-learn: the model calls stay cold
        pass
    else:
        rows = [[0.0, 1.0], [1.0, 0.0], [2.0, 1.0], [3.0, 0.0]]
        model = LogisticRegression().fit(rows, [0, 0, 1, 1])
        _flavour, logged = log_model(
            client, stage_id, experiment, "model", model, input_example=rows
        )
        register(
            client,
            "pipekit-warmup.model",
            logged.artifact_location,
            stage_id,
            {},
            _NoStage(),
            logged,
        )
        consumer = client.create_run(experiment, tags={"mlflow.parentRunId": parent_id})
        from mlflow.entities import LoggedModelInput

        client.log_inputs(consumer.info.run_id, models=[LoggedModelInput(logged.model_id)])
        client.set_terminated(consumer.info.run_id, "FINISHED")
    version_for_cache_key(client, "pipekit-warmup.model", "0" * 16)
    run_for_cache_key(client, experiment, "0" * 16)
    log_batch(
        client,
        stage_id,
        params={"stage.a": "1"},
        metrics={"score": 1.0},
        tags={tag.CACHE_HIT: "true"},
    )
    client.set_terminated(stage_id, "FINISHED")
    client.set_terminated(parent_id, "FINISHED")


class _NoStage:
    description = None

"""The inference DAG as one MLflow pyfunc: `ServingModel`.

The exported model carries the `serve` section (as plain data), the pinned stage model
versions (as MLflow models under `artifacts/`), and no pickled stage objects of its own:
`load_context` loads each stage model and imports each function, then `predict` runs
`core.serving.Inference`. So `mlflow models serve -m models:/<pipeline>.serving/<v>
--env-manager local` serves it unchanged, wherever pipekit and the stage functions import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# This module *is* the MLflow model class (pickled by reference into every exported model),
# so it subclasses MLflow's and names the DataFrame it predicts on; only export, the server
# and batch import it, lazily.
import mlflow.pyfunc  # noqa: TID253
import pandas as pd  # noqa: TID253

from ..core.serving import METHODS, Inference, ServeSpec, functions, parse_serve
from ..errors import ServingError

#: Longest reason text in an error message.
REASON_CHARS = 1000


class ServingModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: `predict(rows)` answers what the inference DAG's output stage returns."""

    def __init__(self, pipeline: str, serve: Mapping[str, Any], pins: Mapping[str, str]):
        #: the pipeline whose `serve` section this is, and that section as plain data
        self.pipeline = pipeline
        self.serve = dict(serve)
        #: training stage -> "<registered model>/<version>" it applies
        self.pins = dict(pins)
        self._inference: Inference | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "serve": self.serve, "pins": self.pins}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._inference = None

    def load_context(self, context: Any) -> None:
        spec = self.spec()
        models = {stage: load_stage_model(context.artifacts[stage]) for stage in spec.models}
        self.bind(spec, models)

    def bind(self, spec: ServeSpec, models: Mapping[str, Any]) -> Inference:
        """Bind the DAG to its model objects (export does this before saving)."""
        for s in spec.stages.values():
            model = models[s.model] if s.model is not None else None
            if s.model is not None and not callable(getattr(model, s.method, None)):
                has = [m for m in METHODS if callable(getattr(model, m, None))]
                raise ServingError(
                    f"pipeline '{spec.pipeline}': serve stage '{s.name}' calls {s.method}() on "
                    f"the model of stage '{s.model}', a {type(model).__name__}, which has no "
                    f"such method; set serve.stages.{s.name}.method to one it has "
                    f"({', '.join(has) or 'none of ' + ', '.join(METHODS)})"
                )
        self._inference = Inference(spec, models, functions(spec))
        return self._inference

    def spec(self) -> ServeSpec:
        spec = parse_serve(self.pipeline, self.serve)
        assert spec is not None
        return spec

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
        """The output stage's answer for the request rows (a DataFrame, as MLflow builds
        it from the request and the signature; the hint keeps MLflow's type-hint
        validation out of the way)."""
        if self._inference is None:
            raise RuntimeError("the serving model was not loaded (load_context not called)")
        return self._inference(model_input)


def load_stage_model(path: str) -> Any:
    """The model object of a stage model saved by pipekit's tracking: the scikit-learn
    estimator itself, or the object a pyfunc wrapper holds (so any method can be called)."""
    import os

    import yaml

    with open(os.path.join(path, "MLmodel"), encoding="utf-8") as f:
        flavors = (yaml.safe_load(f) or {}).get("flavors", {})
    if "sklearn" in flavors:
        import mlflow.sklearn

        return mlflow.sklearn.load_model(path)
    loaded = mlflow.pyfunc.load_model(path)
    try:
        python_model = loaded.unwrap_python_model()
    except Exception:  # another flavour's pyfunc: it offers predict only
        return loaded
    return getattr(python_model, "wrapped", python_model)


def as_frame(predictions: Any) -> Any:
    """Predictions as a DataFrame (batch output): frames as they are, a 1-d result as the
    column `prediction`, a 2-d one as `prediction_0..k`, a dict of columns as columns."""
    import numpy as np
    import pandas as pd

    if isinstance(predictions, pd.DataFrame):
        return predictions.reset_index(drop=True)
    if isinstance(predictions, pd.Series):
        return predictions.reset_index(drop=True).to_frame(predictions.name or "prediction")
    if isinstance(predictions, Mapping):
        return pd.DataFrame(dict(predictions))
    array = np.asarray(predictions)
    if array.ndim == 1:
        return pd.DataFrame({"prediction": array})
    if array.ndim == 2:
        return pd.DataFrame(array, columns=[f"prediction_{i}" for i in range(array.shape[1])])
    raise ServingError(
        f"batch prediction needs rows, but the model returned a {array.ndim}-d array; make "
        f"the serve output stage return a DataFrame"
    )


def reason(exc: BaseException) -> str:
    """MLflow's message without the echoed payload and schema (the part after its last
    'Error:', behind a short lead such as 'Ensure that input is a valid JSON formatted
    string'), plus the cause of an 'unexpected error', which MLflow keeps in its trace."""
    message = str(getattr(exc, "message", exc)).split("\nInput:", 1)[0]
    if "Error:" in message:
        lead, _, _ = message.partition("Error:")
        message = message.rsplit("Error:", 1)[1].strip().strip("'")
        lead = " ".join(lead.split()).rstrip(". ")
        if lead and len(lead) < 120 and "'" not in lead:
            message = f"{lead}: {message}"
    message = " ".join(message.split())
    trace = (getattr(exc, "json_kwargs", None) or {}).get("stack_trace")
    if trace and "unexpected error" in message.lower():
        lines = [line for line in str(trace).strip().splitlines() if line.strip()]
        if lines:
            message = f"{message} ({lines[-1].strip()})"
    return message[:REASON_CHARS] or "bad request"

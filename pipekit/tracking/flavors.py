"""How a stage output becomes an MLflow model: sklearn flavour, or a pyfunc wrapper.

Requirements are pinned explicitly from the installed distributions: MLflow's own
inference imports and profiles the model (~2.7 s per model here), this takes ~1 ms.
mlflow is imported inside the functions only.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

__all__ = ["quiet", "requirements", "sample", "save_model"]

#: Rows of an input example kept with a model (MLflow stores it as JSON beside the model).
EXAMPLE_ROWS = 5


def save_model(
    obj: Any,
    path: str,
    input_example: Any = None,
    *,
    candidates: Mapping[str, Any] | None = None,
    mlflow_model: Any = None,
) -> str:
    """Save `obj` as an MLflow model at `path` with explicit pip requirements; the flavour.

    scikit-learn estimators use the sklearn flavour (its pyfunc calls `predict`, or
    `transform` for a transformer); any other picklable object is wrapped as a pyfunc
    whose `predict` calls `obj.predict`, `obj.transform` or `obj`. The first rows of an
    input example are stored with the model and its signature is inferred from them and
    from what the model returns for them: `input_example` (what serving feeds it) when
    given and `obj` accepts it, else the first of `candidates` (argument -> a few rows of
    what the stage received, see `sample`) that `obj` accepts. `mlflow_model` (an
    `mlflow.models.Model` naming the logged model and run) is written as its MLmodel.
    """
    example, signature = _signature(obj, input_example, candidates or {})
    if _is_sklearn(obj):
        import mlflow.sklearn

        with quiet("mlflow.sklearn"), quiet("mlflow.models.model"):
            mlflow.sklearn.save_model(
                obj,
                path,
                serialization_format="cloudpickle",
                pip_requirements=_requirements(obj, ["scikit-learn", "cloudpickle"]),
                signature=signature,
                input_example=example,
                pyfunc_predict_fn=_method(obj) or "predict",
                mlflow_model=mlflow_model,
            )
        return "sklearn"
    import cloudpickle
    import mlflow.pyfunc

    try:  # MLflow's own message does not say what failed
        cloudpickle.dumps(obj)
    except Exception as exc:
        raise TypeError(
            f"the {type(obj).__name__} output cannot be pickled ({exc}); a model stage "
            f"must return a picklable object"
        ) from exc
    # MLflow's notice that a python_model object is cloudpickled: that is the point here
    with quiet("mlflow.models.model"), quiet("mlflow.pyfunc"):
        mlflow.pyfunc.save_model(
            path,
            python_model=_wrapper(obj),
            pip_requirements=_requirements(obj, ["cloudpickle"]),
            signature=signature,
            input_example=example,
            mlflow_model=mlflow_model,
        )
    return "pyfunc"


def _method(obj: Any) -> str | None:
    """What the pyfunc calls on `obj`: `predict`, else `transform` (None: obj itself)."""
    for method in ("predict", "transform"):
        if callable(getattr(obj, method, None)):
            return method
    return None


def _signature(obj: Any, input_example: Any, candidates: Mapping[str, Any]) -> tuple[Any, Any]:
    """(an example's first rows, the signature inferred from them and obj's answer), from
    the first example obj accepts, or (None, None) (logged, not raised: a model without
    a signature is still a model)."""
    tries = [("the serve example", input_example)] if input_example is not None else []
    tries += [(f"input '{arg}'", value) for arg, value in candidates.items() if _rows(value)]
    failed = []
    for label, value in tries:
        try:
            example = _columns_for(obj, _head(value))
            method = _method(obj)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "X has feature names, but ..."
                output = getattr(obj, method)(example) if method else obj(example)
                from mlflow.models import infer_signature

                return example, infer_signature(example, output)
        except Exception as exc:
            failed.append(f"{label}: {type(exc).__name__}: {exc}")
    if failed:
        logging.getLogger(__name__).info(
            "pipekit: %s logged without a signature: no example fits it (%s)",
            type(obj).__name__,
            "; ".join(failed),
        )
    return None, None


def _rows(value: Any) -> bool:
    """Whether `value` looks like rows a model is applied to (a frame, an array, a list)."""
    if isinstance(value, (list, tuple)):
        return bool(value)
    shape = getattr(value, "shape", None)
    return isinstance(shape, tuple) and len(shape) >= 1 and shape[0] > 0


def _head(value: Any) -> Any:
    return value.head(EXAMPLE_ROWS) if hasattr(value, "head") else value[:EXAMPLE_ROWS]


def _columns_for(obj: Any, rows: Any) -> Any:
    """A frame's columns the model was fitted on, in its order (the others, e.g. the
    target, dropped), when the model knows them (`feature_names_in_`)."""
    names = getattr(obj, "feature_names_in_", None)
    columns = getattr(rows, "columns", None)
    if names is None or columns is None:
        return rows
    wanted = [str(n) for n in names]
    if list(map(str, columns)) == wanted or not set(wanted) <= set(map(str, columns)):
        return rows
    return rows[wanted]


def sample(value: Any, rows: int = EXAMPLE_ROWS) -> Any:
    """A few rows of a stage's input, copied (the full output is not kept alive) and with
    secret-looking columns (and record keys) masked (`core.redact`), or None when `value`
    is not rows.

    Runs in the driver without importing pandas or numpy: frames, series and arrays are
    recognised by their `shape`/`head`; lists and tuples of rows are sliced.
    """
    import copy

    from ..core.redact import MASK, is_secret_key, redact

    if not _rows(value):
        return None
    try:
        if isinstance(value, (list, tuple)):
            return copy.deepcopy(redact(list(value[:rows])))  # records: secret keys masked
        if hasattr(value, "head") and hasattr(value, "copy"):
            part = value.head(rows).copy()
            for column in getattr(part, "columns", ()):
                if is_secret_key(str(column)):
                    part[column] = MASK
            return part
        return value[:rows].copy()  # an array: a copy, not a view of the whole
    except Exception:  # an exotic container: no example from it
        return None


def _is_sklearn(obj: Any) -> bool:
    base = sys.modules.get("sklearn.base")
    return base is not None and isinstance(obj, base.BaseEstimator)


def _wrapper(obj: Any) -> Any:
    """A pyfunc PythonModel holding `obj` (defined here so cloudpickle stores it by value)."""
    import mlflow.pyfunc

    class PickledObject(mlflow.pyfunc.PythonModel):
        # `wrapped` decides what input it takes (the signature says so): MLflow's type-hint
        # validation, and its "add type hints" warning on every definition and load, is off
        _skip_type_hint_validation = True

        def __init__(self, wrapped: Any):
            self.wrapped = wrapped

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            for method in ("predict", "transform"):
                if hasattr(self.wrapped, method):
                    return getattr(self.wrapped, method)(model_input)
            if callable(self.wrapped):
                return self.wrapped(model_input)
            raise TypeError(f"{type(self.wrapped).__name__} has no predict/transform")

    return PickledObject(obj)


def requirements(packages: list[str]) -> list[str]:
    """`packages` pinned to their installed versions (the ones not installed left out)."""
    from importlib import metadata

    pinned = []
    for dist in packages:
        try:
            pinned.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


def _requirements(obj: Any, packages: list[str]) -> list[str]:
    """Pinned requirements for `packages` plus the distribution defining `obj`'s type."""
    wanted = list(packages)
    root = type(obj).__module__.split(".", 1)[0]
    for dist in _distributions().get(root, []):
        if dist not in wanted:
            wanted.append(dist)
    return requirements(wanted)


@lru_cache(maxsize=1)
def _distributions() -> Mapping[str, list[str]]:
    """Top-level module -> distributions. MLflow's check of a model's requirements builds
    the same map (a scan of every installed distribution, ~0.3 s of CPU): it is read from
    there, so a process scans once; our own scan if MLflow's private copy moved."""
    from importlib import metadata

    found: Any = None
    try:
        from mlflow.utils import requirements_utils as mlflow_requirements

        mlflow_requirements._init_modules_to_packages_map()
        found = mlflow_requirements._MODULES_TO_PACKAGES
    except Exception as exc:
        logging.getLogger(__name__).debug("pipekit: MLflow's distribution map: %s", exc)
    if not isinstance(found, Mapping):
        found = metadata.packages_distributions()
    skip = {"builtins", "__main__", "pipekit"}
    return {k: list(v) for k, v in found.items() if k not in skip and "." not in k}


class quiet:
    """Silence one logger's warnings (the sklearn flavour's pickle notice) for a block."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)

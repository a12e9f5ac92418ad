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

__all__ = ["quiet", "requirements", "save_model"]

#: Rows of an input example kept with a model (MLflow stores it as JSON beside the model).
EXAMPLE_ROWS = 5


def save_model(obj: Any, path: str, input_example: Any = None) -> str:
    """Save `obj` as an MLflow model at `path` with explicit pip requirements; the flavour.

    scikit-learn estimators use the sklearn flavour (its pyfunc calls `predict`, or
    `transform` for a transformer); any other picklable object is wrapped as a pyfunc
    whose `predict` calls `obj.predict`, `obj.transform` or `obj`. With `input_example`
    (rows the model is applied to), the first rows are stored with the model and its
    signature is inferred from them and from what the model returns for them.
    """
    example, signature = _signature(obj, input_example)
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
    with warnings.catch_warnings(), quiet("mlflow.models.model"):
        warnings.simplefilter("ignore", UserWarning)  # "add type hints": obj decides the input
        mlflow.pyfunc.save_model(
            path,
            python_model=_wrapper(obj),
            pip_requirements=_requirements(obj, ["cloudpickle"]),
            signature=signature,
            input_example=example,
        )
    return "pyfunc"


def _method(obj: Any) -> str | None:
    """What the pyfunc calls on `obj`: `predict`, else `transform` (None: obj itself)."""
    for method in ("predict", "transform"):
        if callable(getattr(obj, method, None)):
            return method
    return None


def _signature(obj: Any, input_example: Any) -> tuple[Any, Any]:
    """(the example's first rows, the signature inferred from them and obj's answer), or
    (None, None) without an example or when obj cannot answer it (logged, not raised: a
    model without a signature is still a model)."""
    if input_example is None:
        return None, None
    try:
        example = (
            input_example.head(EXAMPLE_ROWS)
            if hasattr(input_example, "head")
            else input_example[:EXAMPLE_ROWS]
        )
        method = _method(obj)
        output = getattr(obj, method)(example) if method else obj(example)
        from mlflow.models import infer_signature

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return example, infer_signature(example, output)
    except Exception as exc:
        logging.getLogger(__name__).info(
            "pipekit: %s logged without a signature: its input example failed: %s: %s",
            type(obj).__name__,
            type(exc).__name__,
            exc,
        )
        return None, None


def _is_sklearn(obj: Any) -> bool:
    base = sys.modules.get("sklearn.base")
    return base is not None and isinstance(obj, base.BaseEstimator)


def _wrapper(obj: Any) -> Any:
    """A pyfunc PythonModel holding `obj` (defined here so cloudpickle stores it by value)."""
    import mlflow.pyfunc

    class PickledObject(mlflow.pyfunc.PythonModel):
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
    from importlib import metadata

    skip = {"builtins", "__main__", "pipekit"}
    return {k: v for k, v in metadata.packages_distributions().items() if k not in skip}


class quiet:
    """Silence one logger's warnings (the sklearn flavour's pickle notice) for a block."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)

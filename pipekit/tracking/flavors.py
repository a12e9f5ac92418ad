"""How a stage output becomes an MLflow model: sklearn flavour, or a pyfunc wrapper.

Requirements are pinned explicitly from the installed distributions: MLflow's own
inference imports and profiles the model (~2.7 s per model here), this takes ~1 ms.
mlflow is imported inside the functions only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

__all__ = ["quiet", "save_model"]


def save_model(obj: Any, path: str) -> str:
    """Save `obj` as an MLflow model at `path` with explicit pip requirements; the flavour.

    scikit-learn estimators use the sklearn flavour; any other picklable object is
    wrapped as a pyfunc whose `predict` calls `obj.predict`, `obj.transform` or `obj`.
    """
    if _is_sklearn(obj):
        import mlflow.sklearn

        with quiet("mlflow.sklearn"):
            mlflow.sklearn.save_model(
                obj,
                path,
                serialization_format="cloudpickle",
                pip_requirements=_requirements(obj, ["scikit-learn", "cloudpickle"]),
            )
        return "sklearn"
    import warnings

    import cloudpickle
    import mlflow.pyfunc

    try:  # MLflow's own message does not say what failed
        cloudpickle.dumps(obj)
    except Exception as exc:
        raise TypeError(
            f"the {type(obj).__name__} output cannot be pickled ({exc}); a model stage "
            f"must return a picklable object"
        ) from exc
    with warnings.catch_warnings():  # "add type hints": the input is whatever obj accepts
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(
            path,
            python_model=_wrapper(obj),
            pip_requirements=_requirements(obj, ["cloudpickle"]),
        )
    return "pyfunc"


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


def _requirements(obj: Any, packages: list[str]) -> list[str]:
    """Pinned requirements for `packages` plus the distribution defining `obj`'s type."""
    from importlib import metadata

    wanted = list(packages)
    root = type(obj).__module__.split(".", 1)[0]
    for dist in _distributions().get(root, []):
        if dist not in wanted:
            wanted.append(dist)
    pinned = []
    for dist in wanted:
        try:
            pinned.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


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

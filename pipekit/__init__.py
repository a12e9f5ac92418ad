"""pipekit: declarative ML pipelines — Hydra configs, Dask execution, MLflow tracking, Jupyter.

    import pipekit as pk
    p = pk.load("cancer", overrides=["stages.train.params.C=0.5"])
    result = p.run()
    result["evaluate"]

Heavy libraries (Dask, MLflow, graphviz, ipywidgets) load only when used.
"""

from __future__ import annotations

from typing import Any

from .config import compose
from .core.events import Observer, RunInfo, StageEvent
from .core.result import RunResult
from .errors import (
    ConfigError,
    CycleError,
    PipekitError,
    StageError,
    UnknownStageError,
)
from .pipeline import Pipeline, load

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CycleError",
    "Observer",
    "PipekitError",
    "Pipeline",
    "RunInfo",
    "RunResult",
    "StageError",
    "StageEvent",
    "UnknownStageError",
    "compose",
    "lineage",
    "load",
    "panel",
    "sweep",
]

_LAZY = {
    "panel": ("panel", "panel"),
    "lineage": ("tracking.lineage", "lineage"),
    "sweep": ("sweep", "sweep"),  # DAG-aware sweeps: one merged graph (pipekit/sweep.py)
}


def __getattr__(name: str) -> Any:
    """Load the optional parts (widgets, tracking) on first use."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        # importing `pipekit.sweep` binds the *module* as `pipekit.sweep`: rebind the function
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipekit' has no attribute {name!r}")

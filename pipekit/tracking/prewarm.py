"""MLflow's import started early, on a daemon thread, for a run tracked from a thread.

Importing MLflow and its SQL stores costs one to two seconds of CPU. `pipekit run` imports
it in its writer process (`writer.py`) and never here; with `PIPEKIT_TRACKING_WRITER=thread`
it starts this import instead, before composing the config, so it overlaps with
composition, validation (importing the stages' targets) and the first stages. Nothing is
opened or written here: the writer thread (`writer.ThreadWriter`) still opens the store,
and simply finds the modules loaded.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None

#: What the writer thread needs first (`client.client_for`), in import order.
MODULES = (
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)


def tracking_on(section: Mapping[str, Any] | None) -> bool:
    """Whether a composed `tracking` section asks for MLflow (cheap: no validation)."""
    from ..core.spec import backend_name

    if not isinstance(section, Mapping) or section.get("enabled", True) is False:
        return False
    return backend_name(section, "off") != "off"


def prewarm() -> None:
    """Start importing MLflow in the background, once per process (a no-op when loaded)."""
    global _thread
    with _lock:
        if _thread is not None or MODULES[-1] in sys.modules:
            return
        _thread = threading.Thread(target=_import, name="pipekit-mlflow-import", daemon=True)
        _thread.start()


def _import() -> None:
    import importlib

    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # the writer thread imports again and reports it
            log.debug("pipekit tracking: early import of %s failed: %s", module, exc)
            return

"""Stage functions for the scale-out tests (matrices, sweeps, distributed): importable by
Dask worker processes, which inherit the tests' sys.path."""

from __future__ import annotations

import os
import time
from pathlib import Path


def counted(log: str, name: str, x=0, value=0, **extra):
    """Appends `name` to the file `log` (so a test counts computations) and adds up."""
    with open(log, "a") as handle:
        handle.write(name + "\n")
    return x + value + sum(v for v in extra.values() if isinstance(v, int | float))


def fit(data=0, region: str = "eu", model: str = "logreg", C: float = 1.0):
    """A stand-in training stage: its output names what it was trained on."""
    return {"region": region, "model": model, "C": C, "data": data}


def score(trained: dict, scale: float = 1.0, **matrix):
    """A dict of metrics for a `fit` output (deterministic); matrix values are ignored."""
    bonus = {"logreg": 0.1, "forest": 0.2}.get(trained["model"], 0.0)
    return {"accuracy": round(min(1.0, 0.5 + bonus + 0.01 * trained["C"]) * scale, 6)}


def collect(models: dict | None = None, items: list | None = None, **rest):
    """A fan-in stage: hands back what it received."""
    return {"models": models, "items": items, **rest}


def die_once(marker: str, x=0, hold: float = 60.0):
    """The first call writes its pid to `marker` and waits to be killed (a test kills the
    process); a later call, after the marker exists, returns its pid."""
    path = Path(marker)
    if path.exists():
        return {"pid": os.getpid(), "first": int(path.read_text())}
    path.write_text(str(os.getpid()))
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise TimeoutError("this worker was not killed")


def pid(x=0):
    return os.getpid()


def measured(log: str, name: str, x=0, value=0):
    """Like `counted`, but a dict output (so the value is a metric: `<stage>.total`)."""
    with open(log, "a") as handle:
        handle.write(name + "\n")
    return {"total": x + value}

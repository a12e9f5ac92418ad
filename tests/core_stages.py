"""Stage functions for the core tests (importable by worker processes via PYTHONPATH)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

NOT_CALLABLE = 42


def const(value=1):
    return value


def add(a, b=0):
    return a + b


def split(value, parts=2):
    return {"head": value // parts, "tail": value - value // parts}


def needs_two(x, y):
    return x + y


def positional_only(x, /):
    return x


def kwargs_ok(**kwargs):
    return sorted(kwargs)


def boom(x=None, message="boom"):
    raise ValueError(message)


def flaky(counter: str, fail_times: int = 1):
    """Fails `fail_times` times, counting attempts in the file `counter`."""
    path = Path(counter)
    attempts = int(path.read_text()) if path.exists() else 0
    path.write_text(str(attempts + 1))
    if attempts < fail_times:
        raise RuntimeError(f"attempt {attempts + 1} failed")
    return attempts + 1


def rendezvous(directory: str, me: str, other: str, timeout: float = 20.0):
    """Returns only if stage `other` runs at the same time (files as a cross-process barrier)."""
    Path(directory, me).write_text(str(os.getpid()))
    deadline = time.monotonic() + timeout
    while not Path(directory, other).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{me} never saw {other} running at the same time")
        time.sleep(0.01)
    return os.getpid()


# --- stage cache tests --------------------------------------------------------------------


def tick(log: str, name: str, value=0, x=0, y=0):
    """Appends `name` to the file `log` (so tests see which stages computed) and adds up."""
    with open(log, "a") as handle:
        handle.write(name + "\n")
    return value + x + y


def fail_if(path: str, x=0):
    """Raises while the file `path` exists: a stage the test can break and then fix."""
    if Path(path).exists():
        raise RuntimeError(f"{path} exists")
    return x + 1


def blob(megabytes: int, fill: int, x=None, pause: float = 0.0, marker: str = ""):
    """A big deterministic output. With `marker`, the output is `[data, PausedWrite]`: its
    cache write stops half-way, announced by the marker file (kill tests land there)."""
    if isinstance(x, list):
        x = x[0]
    if x is not None:
        assert len(x) == megabytes << 20 and x[:1] == bytes([fill - 1]), "bad upstream value"
    time.sleep(pause)
    data = bytes([fill]) * (megabytes << 20)
    return [data, PausedWrite(marker)] if marker else data


class PausedWrite:
    """Pickles to nothing, but while being pickled writes `marker` and sleeps: whatever was
    pickled before it (a big bytes object) is already on disk, the rest is not."""

    def __init__(self, marker: str = ""):
        self.marker = marker

    def __reduce__(self):
        if self.marker:
            Path(self.marker).write_text("writing")
            time.sleep(60)
        return (PausedWrite, ())


# --- faults: stages that exit, hang, die or return what cannot travel (test_faults.py) ----


def exits(code=0, x=None):
    """A stage that ends the process the way scripts do."""
    import sys

    sys.exit(code)


def exits_once(counter: str, code=0):
    """Calls sys.exit on its first attempt (counted in the file `counter`), then returns."""
    import sys

    path = Path(counter)
    attempts = int(path.read_text()) if path.exists() else 0
    path.write_text(str(attempts + 1))
    if attempts == 0:
        sys.exit(code)
    return attempts + 1


def lock(x=None):
    """An output no pickle can carry to another process."""
    import threading

    return {"lock": threading.Lock()}


def hang(directory: str, name: str, seconds: float = 3600.0, x=None):
    """Writes its pid to `directory/name` (atomically), then sleeps: a stage that hangs."""
    Path(directory, name + ".tmp").write_text(str(os.getpid()))
    os.replace(Path(directory, name + ".tmp"), Path(directory, name))
    time.sleep(seconds)
    return 1


def dies(code=3, x=None):
    """Ends its process at once, past every `except` and `finally`."""
    os._exit(code)


# --- params against annotations, input keys against declared outputs (test_sections.py) ---


def typed(
    n: int,
    rate: float = 0.5,
    name: str = "x",
    flag: bool = False,
    items: list | None = None,
    table: dict[str, int] | None = None,
    mode: Literal["fast", "slow"] = "fast",
    limit: int | None = None,
    either: int | str = 0,
    anything=None,
    numbers: tuple[float, ...] = (),
):
    """Echoes its arguments: a stage whose params have every simple kind of annotation."""
    return {"n": n, "rate": rate, "name": name, "mode": mode, "limit": limit}


class FeatureSet(TypedDict):
    X: list
    y: list


@dataclass
class Split:
    train: list
    test: list


def features(n: int = 3) -> FeatureSet:
    return {"X": list(range(n)), "y": [i % 2 for i in range(n)]}


def split_data(n: int = 4) -> Split:
    return Split(list(range(n // 2)), list(range(n // 2, n)))


def undeclared(n: int = 3) -> dict:
    return {"X": list(range(n))}


# --- promotion (tests/test_promotion.py): small scikit-learn models -----------------------


def fit_logreg(C: float = 1.0):
    """A fitted LogisticRegression on a fixed tiny data set (registers in a blink)."""
    from sklearn.linear_model import LogisticRegression

    X = [[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1], [0.1, 0.8], [0.8, 0.3]]
    y = [0, 1, 0, 1, 0, 1]
    return LogisticRegression(C=C, max_iter=200).fit(X, y)


def rate_model(model, key: str = "score") -> dict:
    """A metric that follows the model's `C` (so params decide which version is best)."""
    return {key: float(model.C)}


def cv_score(C: float = 1.0) -> dict:
    """A tuning stage: the `C` to fit and its (made-up, deterministic) score."""
    return {"C": C, "score": float(C)}

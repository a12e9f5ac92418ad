"""The book's production pipeline: collect data twice, combine, train, publish.

Stages pass file paths, the way Airflow tasks do: the collectors write CSV files under a
data directory, `combine` joins them into one CSV, `train` fits a scikit-learn model on
it and `publish` is a gate that passes when the model clears a metric threshold (its
`promote: champion` then moves the alias to the new version).

The data is made up but deterministic: a collector generates the rows of batch 0 (there
from the start) and of every batch that has "landed" since, from `(seed, source, batch)`.
A batch lands as a small JSON file in `<data_dir>/batches/` (`{"batch": 3}`): new data
arrives when a new batch file appears, written by `land_batch(data_dir)` or by hand. The
collectors are `cache: false` (they read that folder every run) and declare their CSV
files as `outs`: a run with no new data re-runs them, finds their output unchanged and
keeps everything after them cached (early cutoff, docs/caching.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

BATCHES = "batches"
FEATURES = ("f1", "f2", "f3", "f4")
_BATCH_FILE = re.compile(r"^batch-(\d+)\.json$")


class QualityGateError(RuntimeError):
    """The model did not clear the publishing threshold: it is not promoted."""


# --- the stages ---------------------------------------------------------------------------


def init_data_dir(data_dir: str) -> str:
    """Create the data directory and its (empty) folder of landed batches; its path."""
    (Path(data_dir) / BATCHES).mkdir(parents=True, exist_ok=True)
    return str(data_dir)


def collect(
    data_dir: str, source: str, output: str, seed: int = 0, rows_per_batch: int = 200
) -> str:
    """Collect batch 0 and every landed batch from `source` into the CSV file `output`."""
    batches = sorted({0, *(read_batch(path) for path in batch_files(data_dir))})
    frames = [_rows(seed, source, batch, rows_per_batch) for batch in batches]
    with _atomic(output) as out:
        pd.concat(frames, ignore_index=True).to_csv(out, index=False)
    return str(output)


def combine(first: str, second: str, output: str) -> str:
    """Join the collected CSV files into one, `output`; its path."""
    frame = pd.concat([pd.read_csv(first), pd.read_csv(second)], ignore_index=True)
    with _atomic(output) as out:
        frame.to_csv(out, index=False)
    return str(output)


def train(data: str, C: float = 1.0, test_size: float = 0.25, seed: int = 0) -> Any:
    """Fit a standardised logistic regression on the training part of the combined CSV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit, _ = _split(pd.read_csv(data), test_size, seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C))
    return model.fit(fit[list(FEATURES)], fit["label"])


def publish(
    model: Any, data: str, threshold: float = 0.8, test_size: float = 0.25, seed: int = 0
) -> dict[str, float]:
    """The quality gate: accuracy on the held-out part; fails below `threshold`."""
    from sklearn.metrics import accuracy_score

    _, held_out = _split(pd.read_csv(data), test_size, seed)
    accuracy = float(accuracy_score(held_out["label"], model.predict(held_out[list(FEATURES)])))
    if accuracy < threshold:
        raise QualityGateError(
            f"accuracy {accuracy:.3f} is below the threshold {threshold}: not published"
        )
    return {"accuracy": accuracy, "held_out_rows": len(held_out)}


# --- data landing -------------------------------------------------------------------------


def batch_files(data_dir: str | Path) -> list[Path]:
    """The landed batch files, oldest batch first."""
    folder = Path(data_dir) / BATCHES
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _BATCH_FILE.match(p.name)]
    return sorted(found, key=lambda p: int(_BATCH_FILE.match(p.name).group(1)))  # type: ignore[union-attr]


def land_batch(data_dir: str | Path) -> Path:
    """New data lands: write the next batch file (what a scheduler's file sensor sees)."""
    folder = Path(data_dir) / BATCHES
    folder.mkdir(parents=True, exist_ok=True)
    taken = [read_batch(p) for p in batch_files(data_dir)]
    number = max(taken, default=0) + 1
    path = folder / f"batch-{number:04d}.json"
    with _atomic(path) as out:
        json.dump({"batch": number}, out)
    return path


def read_batch(path: Path) -> int:
    """The batch number a batch file holds."""
    try:
        number = json.loads(path.read_text())["batch"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f'{path}: not a batch file like {{"batch": 3}} ({exc})') from exc
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise ValueError(f"{path}: 'batch' must be a non-negative integer, got {number!r}")
    return number


# --- helpers ------------------------------------------------------------------------------


def _rows(seed: int, source: str, batch: int, count: int) -> pd.DataFrame:
    """`count` labelled rows of `batch` from `source`: the same arguments, the same rows.

    Every source and batch shares one hidden linear rule (from `seed`), so more data
    makes a better model."""
    rule = np.random.default_rng(seed).normal(size=len(FEATURES))
    source_id = int(hashlib.sha256(source.encode()).hexdigest()[:12], 16)
    rng = np.random.default_rng([seed, source_id, batch])
    features = rng.normal(size=(count, len(FEATURES)))
    noise = rng.normal(scale=0.5, size=count)
    frame = pd.DataFrame(features, columns=list(FEATURES))
    frame["label"] = (features @ rule + noise > 0).astype(int)
    frame.insert(0, "batch", batch)
    frame.insert(0, "source", source)
    return frame


def _split(frame: pd.DataFrame, test_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and held-out rows, the same for `train` and `publish`."""
    from sklearn.model_selection import train_test_split

    return train_test_split(frame, test_size=test_size, random_state=seed, stratify=frame["label"])


@contextmanager
def _atomic(path: str | Path) -> Iterator[IO[str]]:
    """Write a text file under a temporary name and rename it into place: a reader (or a
    failed stage) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            yield handle
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

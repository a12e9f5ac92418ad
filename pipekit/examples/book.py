"""The book's production pipeline: collect data twice, combine, train, publish.

Stages pass file paths, the way Airflow tasks do: the collectors write CSV files under a
data directory, `combine` joins them into one CSV, `train` fits a scikit-learn model on
it and `publish` is a gate that passes when the model clears a metric threshold (its
`promote` then moves `@champion` to the new version if its accuracy beats the holder's).
`request_example` and `respond` belong to the `serve` section: a request's rows are scored
by the `train` model and answered with a label and its probability.

The data is made up but deterministic: a collector generates the rows of batch 0 (there
from the start) and of every batch that has "landed" since, from `(seed, source, batch)`.
A batch lands as a small JSON file in `<data_dir>/batches/` (`{"batch": 3}`): new data
arrives when a new batch file appears, written by `land_batch(data_dir)` or by hand. The
collectors are `cache: false` (they read that folder every run) and declare their CSV
files as `outs`: a run with no new data re-runs them, finds their output unchanged and
keeps everything after them cached (early cutoff, docs/caching.md).

A batch file may also say how noisy its labels are (`{"batch": 3, "noise": 0.0}`; the
default is `NOISE`, 0.5): a clean batch makes the held-out accuracy, and so the model
`publish` judges, better; a noisy one (`"noise": 1.5`) makes it worse, which the metric
promotion must not publish. `land_batch(data_dir, noise=...)` writes either.
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
#: The label noise (standard deviation) of batch 0 and of a batch file that sets none.
NOISE = 0.5
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
    noise = {0: NOISE}
    for path in batch_files(data_dir):
        number, level = read_batch(path)
        noise[number] = level
    frames = [_rows(seed, source, b, rows_per_batch, noise[b]) for b in sorted(noise)]
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


# --- serving (the `serve` section) -------------------------------------------------------


def request_example(rows: int = 5, seed: int = 0) -> pd.DataFrame:
    """Example request rows (the feature columns only): the served model's signature."""
    return _rows(seed, "request", 0, rows)[list(FEATURES)]


def respond(proba: Any, threshold: float = 0.5) -> pd.DataFrame:
    """The answer per row: the predicted label and the probability of label 1."""
    probability = np.asarray(proba)[:, 1]
    return pd.DataFrame(
        {"label": (probability >= threshold).astype("int64"), "probability": probability}
    )


# --- data landing -------------------------------------------------------------------------


def batch_files(data_dir: str | Path) -> list[Path]:
    """The landed batch files, oldest batch first."""
    folder = Path(data_dir) / BATCHES
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _BATCH_FILE.match(p.name)]
    return sorted(found, key=lambda p: int(_BATCH_FILE.match(p.name).group(1)))  # type: ignore[union-attr]


def land_batch(data_dir: str | Path, noise: float | None = None) -> Path:
    """New data lands: write the next batch file (what a scheduler's file sensor sees);
    `noise`, when given, is its label noise (0.0: a clean batch)."""
    folder = Path(data_dir) / BATCHES
    folder.mkdir(parents=True, exist_ok=True)
    taken = [read_batch(p)[0] for p in batch_files(data_dir)]
    number = max(taken, default=0) + 1
    path = folder / f"batch-{number:04d}.json"
    body: dict[str, Any] = {"batch": number}
    if noise is not None:
        body["noise"] = float(noise)
    with _atomic(path) as out:
        json.dump(body, out)
    return path


def read_batch(path: Path) -> tuple[int, float]:
    """The batch number a batch file holds, and its label noise."""
    try:
        body = json.loads(path.read_text())
        number, noise = body["batch"], body.get("noise", NOISE)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f'{path}: not a batch file like {{"batch": 3}} ({exc})') from exc
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise ValueError(f"{path}: 'batch' must be a non-negative integer, got {number!r}")
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0 <= noise < 1e6:
        raise ValueError(f"{path}: 'noise' must be a number >= 0 (0: clean labels), got {noise!r}")
    return number, float(noise)


# --- helpers ------------------------------------------------------------------------------


def _rows(seed: int, source: str, batch: int, count: int, noise: float = NOISE) -> pd.DataFrame:
    """`count` labelled rows of `batch` from `source`: the same arguments, the same rows.

    Every source and batch shares one hidden linear rule (from `seed`); a label is the
    rule's side of zero after Gaussian noise of standard deviation `noise`."""
    rule = np.random.default_rng(seed).normal(size=len(FEATURES))
    source_id = int(hashlib.sha256(source.encode()).hexdigest()[:12], 16)
    rng = np.random.default_rng([seed, source_id, batch])
    features = rng.normal(size=(count, len(FEATURES)))
    jitter = rng.normal(size=count) * noise
    frame = pd.DataFrame(features, columns=list(FEATURES))
    frame["label"] = (features @ rule + jitter > 0).astype(int)
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

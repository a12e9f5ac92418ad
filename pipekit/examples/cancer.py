"""The book's pipeline-pattern DAG on scikit-learn's bundled breast-cancer data.

Two collection stages run in parallel, are combined, validated, split; a fitted scaler
and a fitted classifier are the model stages; `publish` passes only when a metric
clears its threshold.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

TARGET = "diagnosis"


def collect(source: str, sources: int = 2) -> pd.DataFrame:
    """Collect one "source": every `sources`-th row of the bundled dataset."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns={"target": TARGET})
    index = ord(source[-1].lower()) - ord("a")
    if not 0 <= index < sources:
        raise ValueError(
            f"source must end in one of a..{chr(ord('a') + sources - 1)}, got {source!r}"
        )
    return frame.iloc[index::sources].reset_index(drop=True)


def combine(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Many-to-one edge: concatenate the sources."""
    return pd.concat([a, b], ignore_index=True)


class ValidationError(ValueError):
    """The data does not meet the expectations of the stages after `validate`."""


def validate(frame: pd.DataFrame, min_rows: int = 100, max_missing: float = 0.0) -> pd.DataFrame:
    """Check row count, target column, missing values; pass the frame through."""
    if TARGET not in frame:
        raise ValidationError(f"column '{TARGET}' is missing")
    if len(frame) < min_rows:
        raise ValidationError(f"{len(frame)} rows, need at least {min_rows}")
    missing = float(frame.isna().mean().max())
    if missing > max_missing:
        raise ValidationError(
            f"{missing:.1%} missing values in a column, allowed {max_missing:.1%}"
        )
    return frame


def split(frame: pd.DataFrame, test_size: float = 0.25, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Stratified train/test split; a dict output so edges can take `split.train`."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        frame, test_size=test_size, random_state=seed, stratify=frame[TARGET]
    )
    return {"train": train.reset_index(drop=True), "test": test.reset_index(drop=True)}


def fit_scaler(frame: pd.DataFrame) -> Any:
    """A fitted feature transform (a model stage)."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(frame.drop(columns=[TARGET]))


def train(
    scaler: Any, frame: pd.DataFrame, C: float = 1.0, max_iter: int = 1000, seed: int = 0
) -> Any:
    """Logistic regression on the scaled features (a model stage)."""
    from sklearn.linear_model import LogisticRegression

    features = scaler.transform(frame.drop(columns=[TARGET]))
    model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    return model.fit(features, frame[TARGET])


def evaluate(model: Any, scaler: Any, frame: pd.DataFrame) -> dict[str, float]:
    """Held-out accuracy, F1 and ROC AUC."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    features = scaler.transform(frame.drop(columns=[TARGET]))
    truth = frame[TARGET]
    predicted = model.predict(features)
    scores = model.predict_proba(features)[:, 1]
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "f1": float(f1_score(truth, predicted)),
        "roc_auc": float(roc_auc_score(truth, scores)),
    }


class PublishRejected(RuntimeError):
    """The candidate model does not clear the bar; nothing is published."""


def publish(scores: dict[str, float], metric: str = "roc_auc", threshold: float = 0.95) -> dict:
    """Approve the models only when `scores[metric] >= threshold`; raise otherwise."""
    if metric not in scores:
        raise PublishRejected(f"metric '{metric}' not among {sorted(scores)}")
    value = scores[metric]
    if value < threshold:
        raise PublishRejected(f"{metric}={value:.4f} is below the threshold {threshold}")
    return {"approved": True, "metric": metric, "value": value, "threshold": threshold}


# --- serving: the `serve` section's example request and response ---------------------------


def request_example(rows: int = 5, source: str = "a") -> pd.DataFrame:
    """Example request rows (the features, without the target) from the bundled dataset.

    Exported models infer their signature from these rows, so a request with a missing
    column or a non-numeric value is rejected before the model sees it.
    """
    return collect(source).drop(columns=[TARGET]).head(rows)


def respond(proba: Any, threshold: float = 0.5) -> pd.DataFrame:
    """The response: the predicted diagnosis (1 = benign) and its probability."""
    import numpy as np

    probability = np.asarray(proba)[:, 1]
    return pd.DataFrame(
        {TARGET: (probability >= threshold).astype("int64"), "probability": probability}
    )

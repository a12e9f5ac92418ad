"""A second example: a classifier chosen by a config group (`model=logreg|forest`)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from sklearn.base import clone


def load(test_size: float = 0.3, seed: int = 0) -> dict[str, pd.DataFrame]:
    """scikit-learn's bundled wine data, split into train and test."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    frame = load_wine(as_frame=True).frame
    train, test = train_test_split(
        frame, test_size=test_size, random_state=seed, stratify=frame["target"]
    )
    return {"train": train, "test": test}


def fit(estimator: Any, frame: pd.DataFrame) -> Any:
    """Fit a copy of the `estimator` stage's (unfitted) estimator on standardised features.

    The wine features span four orders of magnitude: unscaled, a logistic regression
    does not converge.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), clone(estimator))
    return model.fit(frame.drop(columns=["target"]), frame["target"])


def score(model: Any, frame: pd.DataFrame) -> dict[str, float]:
    """Accuracy and macro F1 on held-out data."""
    from sklearn.metrics import accuracy_score, f1_score

    predicted = model.predict(frame.drop(columns=["target"]))
    return {
        "accuracy": float(accuracy_score(frame["target"], predicted)),
        "f1_macro": float(f1_score(frame["target"], predicted, average="macro")),
    }


def request_example(rows: int = 5) -> pd.DataFrame:
    """Example request rows (the 13 features, without the target): the serving signature."""
    from sklearn.datasets import load_wine

    return load_wine(as_frame=True).data.head(rows)

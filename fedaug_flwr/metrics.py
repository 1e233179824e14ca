"""Classification metrics (scikit-learn) and their aggregation over clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

METRIC_NAMES = ("loss", "accuracy", "macro-f1")


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, mean_loss: float
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 (over labels seen in truth or prediction)."""
    return {
        "loss": float(mean_loss),
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro-f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def aggregate_clients(
    per_client: Iterable[Mapping[str, float]], weight_key: str = "num-examples"
) -> dict[str, float]:
    """Unweighted mean (as the study reports) and example-weighted mean of each metric.

    Keys: ``<metric>`` for the unweighted mean, ``<metric>-weighted`` for the
    weighted one, plus ``num-clients``.
    """
    rows = list(per_client)
    if not rows:
        return {}
    weights = np.array([float(row[weight_key]) for row in rows])
    result: dict[str, float] = {"num-clients": float(len(rows))}
    for name in METRIC_NAMES:
        values = np.array([float(row[name]) for row in rows if name in row])
        if len(values) != len(rows):
            continue
        result[name] = float(values.mean())
        result[f"{name}-weighted"] = float((values * weights).sum() / weights.sum())
    return result

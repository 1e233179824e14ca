"""Classification metrics (scikit-learn) and their aggregation over clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from fedaug_flwr.data import NUM_CLASSES

METRIC_NAMES = ("loss", "accuracy", "macro-f1", "micro-f1", "macro-f1-present", "macro-f1-all")
ALL_LABELS = list(range(NUM_CLASSES))


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, mean_loss: float
) -> dict[str, float]:
    """Loss, accuracy and F1 scores of ``predictions`` against the true ``labels``.

    The three macro-F1 scores differ only in the labels they average over, which
    matters on a client's test split that lacks some digits:

    - ``macro-f1``: scikit-learn's default, the labels seen in truth or prediction;
    - ``macro-f1-present``: the labels present in ``labels`` (this split's truth); an
      image predicted as an absent label counts as a miss of its true label only;
    - ``macro-f1-all``: all ten labels 0..9; a label with neither true nor predicted
      images scores 0.

    ``micro-f1`` pools every image (for single-label predictions it equals accuracy).
    A label whose precision or recall is 0/0 scores 0 (``zero_division=0``).
    """
    present = np.unique(labels).tolist()
    return {
        "loss": float(mean_loss),
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro-f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "micro-f1": float(f1_score(labels, predictions, average="micro", zero_division=0)),
        "macro-f1-present": _macro_f1(labels, predictions, present),
        "macro-f1-all": _macro_f1(labels, predictions, ALL_LABELS),
    }


def _macro_f1(labels: np.ndarray, predictions: np.ndarray, over: list[int]) -> float:
    return float(f1_score(labels, predictions, labels=over, average="macro", zero_division=0))


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

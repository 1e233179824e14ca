"""Classification metrics: the three macro-F1 label sets, micro-F1, and client aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fedaug_flwr.metrics import METRIC_NAMES, aggregate_clients, classification_metrics

# A client whose test split holds only digits 0, 1 and 2; the model also predicts a 3.
TRUTH = np.array([0, 0, 0, 1, 1, 2])
PREDICTED = np.array([0, 0, 1, 1, 3, 2])
# Per label, by hand:
#   0: TP 2, FP 0, FN 1 -> P 1,   R 2/3 -> F1 0.8
#   1: TP 1, FP 1, FN 1 -> P 1/2, R 1/2 -> F1 0.5
#   2: TP 1, FP 0, FN 0 -> F1 1
#   3: TP 0, FP 1, FN 0 -> P 0, R 0/0 -> F1 0
#   4..9: no true and no predicted image -> F1 0 (zero_division=0)
F1_SUM = 0.8 + 0.5 + 1.0 + 0.0


def test_three_macro_f1_label_sets_differ_on_a_split_that_lacks_labels():
    metrics = classification_metrics(TRUTH, PREDICTED, mean_loss=0.25)
    assert metrics["loss"] == 0.25
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["micro-f1"] == pytest.approx(4 / 6)  # single-label: equal to accuracy
    assert metrics["macro-f1"] == pytest.approx(F1_SUM / 4)  # labels 0-3: truth or prediction
    assert metrics["macro-f1-present"] == pytest.approx(F1_SUM / 3)  # labels 0-2: truth
    assert metrics["macro-f1-all"] == pytest.approx(F1_SUM / 10)  # labels 0-9
    assert set(metrics) == set(METRIC_NAMES)


def test_the_numbers_are_scikit_learns():
    metrics = classification_metrics(TRUTH, PREDICTED, mean_loss=0.0)
    assert metrics["macro-f1"] == f1_score(TRUTH, PREDICTED, average="macro", zero_division=0)
    assert metrics["micro-f1"] == f1_score(TRUTH, PREDICTED, average="micro", zero_division=0)
    assert metrics["macro-f1-present"] == f1_score(
        TRUTH, PREDICTED, labels=[0, 1, 2], average="macro", zero_division=0
    )
    assert metrics["macro-f1-all"] == f1_score(
        TRUTH, PREDICTED, labels=list(range(10)), average="macro", zero_division=0
    )


def test_all_three_agree_when_every_label_is_present_and_predicted():
    truth = np.arange(10).repeat(2)
    predicted = truth.copy()
    predicted[0] = 1
    metrics = classification_metrics(truth, predicted, mean_loss=0.0)
    assert metrics["macro-f1"] == metrics["macro-f1-present"] == metrics["macro-f1-all"]


def test_client_aggregation_carries_every_metric():
    first = {**classification_metrics(TRUTH, PREDICTED, 1.0), "num-examples": 6}
    second = {**classification_metrics(np.arange(10), np.arange(10), 0.5), "num-examples": 10}
    aggregated = aggregate_clients([first, second])
    for name in METRIC_NAMES:
        assert aggregated[name] == pytest.approx((first[name] + second[name]) / 2)
        weighted = (6 * first[name] + 10 * second[name]) / 16
        assert aggregated[f"{name}-weighted"] == pytest.approx(weighted)
    assert aggregated["macro-f1-all"] == pytest.approx((F1_SUM / 10 + 1.0) / 2)

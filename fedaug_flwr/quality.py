"""Generator quality: how well a classifier trained only on synthetic images does on
real ones (classification accuracy score), per class, and how confident it is on
real versus synthetic images (the study's Figure 14)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score, recall_score

from fedaug_flwr.data import NUM_CLASSES
from fedaug_flwr.training import TensorData, predict

HISTOGRAM_BINS = np.linspace(0.0, 1.0, 21)


def per_class_scores(model: torch.nn.Module, data: TensorData, batch_size: int) -> dict:
    """Overall and per-class accuracy (recall) and F1, plus probability histograms."""
    probabilities, mean_loss = predict(model, data, batch_size)
    probabilities = probabilities.cpu().numpy()
    labels = data.labels.cpu().numpy()
    predictions = probabilities.argmax(axis=1)
    classes = list(range(NUM_CLASSES))
    confidence, _ = np.histogram(probabilities.max(axis=1), bins=HISTOGRAM_BINS)
    true_class, _ = np.histogram(probabilities[np.arange(len(labels)), labels], HISTOGRAM_BINS)
    return {
        "loss": float(mean_loss),
        "accuracy": float((predictions == labels).mean()),
        "macro-f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "per-class-accuracy": [
            float(v)
            for v in recall_score(
                labels, predictions, labels=classes, average=None, zero_division=0
            )
        ],  # fmt: skip
        "per-class-f1": [
            float(v)
            for v in f1_score(labels, predictions, labels=classes, average=None, zero_division=0)
        ],
        "histogram-max-probability": [int(c) for c in confidence],
        "histogram-true-class-probability": [int(c) for c in true_class],
    }


def generator_quality(
    model: torch.nn.Module,
    real_test: TensorData,
    synthetic_test: TensorData,
    batch_size: int,
    description: str,
) -> dict:
    """Train-on-synthetic / test-on-real scores of ``model``, described for the summary."""
    model = model.cpu()
    return {
        "classifier": description,
        "histogram-bin-edges": [float(e) for e in HISTOGRAM_BINS],
        "real-test": per_class_scores(model, real_test, batch_size),
        "synthetic-test": per_class_scores(model, synthetic_test, batch_size),
    }

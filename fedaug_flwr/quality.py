"""Generator quality: how well a classifier trained only on synthetic images does on
real ones (classification accuracy score), per class, and how confident it is on
real versus synthetic images (the study's Figure 14).

A bare train-on-synthetic score says little on its own, so the quick check sets a
reference beside it: the same classifier with the same budget trained on as many
real images with the same label counts (see :data:`REFERENCE_NOTE`), whose
features also give the Fréchet distance and coverage (:mod:`fedaug_flwr.fidelity`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score, recall_score

from fedaug_flwr.data import NUM_CLASSES, Digits
from fedaug_flwr.pretrain import proportional_counts
from fedaug_flwr.training import TensorData, predict

HISTOGRAM_BINS = np.linspace(0.0, 1.0, 21)
# Real global-test images (and as many synthetic ones) the fidelity numbers compare at
# most: a few thousand keep covariances and per-class distances cheap on a CPU.
FIDELITY_IMAGES = 5000
GAP_METRICS = ("accuracy", "macro-f1")
REFERENCE_NOTE = (
    "'reference' is the same classifier, trained with the same budget (images, epochs, "
    "optimizer settings, seed) on REAL images of the run's training pool with the same label "
    "counts as the synthetic training set. The server has these images here only because it "
    "loads the dataset for its global test set; a real deployment would not have them. It is "
    "a measurement aid: 'gap' (reference minus synthetic, on the real global test set) says "
    "how far training on synthetic images falls short of training on real ones, and "
    "'fidelity' compares real and synthetic images in the reference's features."
)


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
        ],
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


def label_matched_sample(
    pool: Digits, counts: Sequence[int], rng: np.random.Generator
) -> tuple[Digits, int]:
    """``counts[c]`` images of each label ``c`` from ``pool``, in random order, and how
    many of them are repeats.

    Drawn without replacement; a label with fewer images in the pool than asked for
    gets all of them plus repeats drawn with replacement, so that the sample keeps
    the asked-for size (a training budget) however small the pool (mnist-5k).
    """
    chosen, repeats = [], 0
    for label, count in enumerate(counts):
        available = np.flatnonzero(pool.labels == label)
        if count > 0 and len(available) == 0:
            raise ValueError(f"the pool has no image of label {label}")
        unique = rng.choice(available, size=min(count, len(available)), replace=False)
        extra = rng.choice(available, size=count - len(unique), replace=True)
        chosen += [unique, extra]
        repeats += len(extra)
    index = rng.permutation(np.concatenate(chosen).astype(np.int64))
    return pool.subset(index), repeats


def fidelity_sample(test: Digits, rng: np.random.Generator) -> Digits:
    """Up to :data:`FIDELITY_IMAGES` real test images, with the test set's label proportions
    (all of it when it is that small)."""
    counts = proportional_counts(min(len(test), FIDELITY_IMAGES), tuple(test.label_counts()))
    sample, _ = label_matched_sample(test, counts, rng)
    return sample


def reference_scores(
    model: torch.nn.Module,
    real_test: TensorData,
    synthetic_test: TensorData,
    batch_size: int,
    description: str,
    train_set: Digits,
    repeats: int,
) -> dict:
    """The reference classifier's scores, like :func:`generator_quality`'s, and its data."""
    model = model.cpu()
    return {
        "classifier": description,
        "label-counts-train": train_set.label_counts(),
        "repeated-images": repeats,
        "real-test": per_class_scores(model, real_test, batch_size),
        "synthetic-test": per_class_scores(model, synthetic_test, batch_size),
    }


def gap(quality: dict, reference: dict) -> dict[str, float]:
    """Reference minus synthetic-trained score on the real test set: what synthetic
    training images cost (positive: the real ones are better)."""
    return {m: reference["real-test"][m] - quality["real-test"][m] for m in GAP_METRICS}

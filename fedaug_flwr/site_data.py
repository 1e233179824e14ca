"""Data files for SuperNodes that bring their own digits (node config ``data-path``).

For trying a deployment without data of your own: each path given gets one
site's digits, a disjoint share of the bundled ``mnist-5k`` client pool (the
4,000 images that are not the server's global test set), in random order::

    .venv/bin/python -m fedaug_flwr.site_data /tmp/fl/data/site-1.npz /tmp/fl/data/site-2-idx

A path ending in ``.npz`` becomes a NumPy file with arrays ``x`` (N, 28, 28)
uint8 and ``y`` (N,) int64; any other path an IDX folder
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``): the two formats
:func:`fedaug_flwr.data.load_node_data` reads.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedaug_flwr.data import Digits, load_source


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


def write_site(path: Path, digits: Digits) -> Path:
    """``digits`` as an ``.npz`` file or, for any other path, an IDX folder."""
    path = Path(path)
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=digits.images.astype(np.uint8), y=digits.labels.astype(np.int64))
        return path
    return write_idx_folder(path, digits.images, digits.labels)


def site_shares(pool: Digits, sites: int, size: int | None, seed: int) -> list[Digits]:
    """``sites`` disjoint random shares of ``pool``, ``size`` images each (default: equal)."""
    size = len(pool) // sites if size is None else size
    if sites < 1 or size < 1 or sites * size > len(pool):
        raise ValueError(f"{sites} sites of {size} images do not fit in {len(pool)} images")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool.subset(order[i * size : (i + 1) * size]) for i in range(sites)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedaug_flwr.site_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("paths", nargs="+", type=Path, help="one per site: .npz or IDX folder")
    parser.add_argument("--size", type=int, default=None, help="images per site (default: equal)")
    parser.add_argument("--seed", type=int, default=0, help="which images go where")
    args = parser.parse_args(argv)
    pool = load_source("mnist-5k", "").pool
    try:
        shares = site_shares(pool, len(args.paths), args.size, args.seed)
    except ValueError as error:
        parser.error(str(error))
    for path, digits in zip(args.paths, shares, strict=True):
        write_site(path, digits)
        print(f"{path}: {len(digits)} images, label counts {digits.label_counts()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

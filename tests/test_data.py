"""Data sources: IDX reading (on small IDX files written here), mnist-5k, fallback."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from fedaug_flwr import data
from fedaug_flwr.data import DataError, binarize, load_idx_folder, read_idx, resolve_source


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_folder(folder, n_train=30, n_test=10, compress=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, compress)
    return arrays


def test_binarize_rounds_pixel_over_255():
    assert binarize(np.array([0, 100, 127, 128, 200, 255])).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_in_torchvision_layout_is_read_and_binarized(tmp_path, compress):
    arrays = write_mnist_folder(tmp_path / "MNIST" / "raw", compress=compress)
    loaded = load_idx_folder(tmp_path)  # finds MNIST/raw below the given folder
    assert loaded.source == "mnist"
    assert loaded.pool.images.shape == (30, 28, 28)
    assert loaded.test.images.shape == (10, 28, 28)
    assert np.array_equal(loaded.pool.images, binarize(arrays["train-images-idx3-ubyte"]))
    assert loaded.pool.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert set(np.unique(loaded.pool.images)) <= {0, 1}


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_not_an_idx_file_is_reported(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04 not idx at all")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def test_missing_idx_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx_folder(tmp_path)


def test_labels_outside_0_to_9_are_rejected(tmp_path):
    folder = tmp_path / "raw"
    write_mnist_folder(folder)
    write_idx(folder / "train-labels-idx1-ubyte", np.full(30, 12))
    with pytest.raises(DataError, match="0..9"):
        load_idx_folder(tmp_path)


def test_mnist5k_is_offline_real_digits_with_disjoint_global_test():
    loaded = data.load_mnist5k()
    assert loaded.source == "mnist-5k"
    assert len(loaded.pool) + len(loaded.test) == 5000
    assert loaded.test.label_counts() == [data.MNIST5K_TEST_PER_CLASS] * 10
    assert set(np.unique(loaded.pool.images)) == {0, 1}
    pool_rows = {row.tobytes() for row in loaded.pool.images}
    assert not any(row.tobytes() in pool_rows for row in loaded.test.images[:50])


def test_mnist_falls_back_to_mnist5k_with_a_reason_when_unavailable(tmp_path, monkeypatch):
    def offline(folder):
        raise OSError("no network")

    monkeypatch.setattr(data, "download_mnist", offline)
    monkeypatch.setenv("FEDAUG_DATA_DIR", str(tmp_path / "cache"))  # the default location
    source, location, reason = resolve_source("mnist", "")
    assert source == "mnist-5k" and location == ""
    assert "no network" in reason and "mnist-5k" in reason


def test_an_explicit_data_dir_that_cannot_be_used_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    downloads = []

    def offline(folder):
        downloads.append(folder)
        raise OSError("no network")

    monkeypatch.setattr(data, "download_mnist", offline)
    typo = tmp_path / "mnsit"
    with pytest.raises(DataError, match=r"data-dir '.*mnsit' does not exist"):
        resolve_source("mnist", str(typo))
    assert not typo.exists() and downloads == []  # nothing downloaded into a mistyped path
    a_file = tmp_path / "mnist.tar"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError, match=r"mnist.tar' is not a folder"):
        resolve_source("mnist", str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"holds no MNIST IDX files .* download into it failed"):
        resolve_source("mnist", str(empty))
    assert downloads == [empty]


def test_a_corrupt_gzipped_idx_file_is_a_data_error_naming_it(tmp_path):
    write_idx(tmp_path / "x-idx3-ubyte", np.zeros((40, 28, 28)), compress=True)
    path = tmp_path / "x-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[20:30] = b"\xff" * 10  # inside the deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"cannot read IDX file .*x-idx3-ubyte.gz"):
        read_idx(path)


def test_images_too_dark_to_binarize_are_refused(tmp_path):
    folder = tmp_path / "raw"
    arrays = write_mnist_folder(folder)
    write_idx(folder / "train-images-idx3-ubyte", arrays["train-images-idx3-ubyte"] // 16)
    with pytest.raises(DataError, match=r"pixels only reach 15: .* all black"):
        load_idx_folder(tmp_path)


def test_mnist_uses_an_existing_idx_folder(tmp_path):
    write_mnist_folder(tmp_path / "raw")
    assert resolve_source("mnist", str(tmp_path)) == ("mnist", str(tmp_path), "")


def test_site_files_hold_the_pool_shares_that_nodes_read_back(tmp_path):
    from fedaug_flwr.data import load_node_data, load_source
    from fedaug_flwr.site_data import main, site_shares

    paths = [tmp_path / "site-1.npz", tmp_path / "sites" / "site-2-idx"]
    assert main([str(p) for p in paths] + ["--size", "300"]) == 0
    assert paths[0].is_file() and paths[1].is_dir()
    shares = site_shares(load_source("mnist-5k", "").pool, 2, 300, seed=0)
    for path, share in zip(paths, shares, strict=True):
        read = load_node_data(path)
        assert np.array_equal(read.images, share.images)
        assert np.array_equal(read.labels, share.labels)
    with pytest.raises(ValueError, match="do not fit in 4000 images"):
        site_shares(load_source("mnist-5k", "").pool, 3, 1500, seed=0)
